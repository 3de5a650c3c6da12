"""Build a DistilBERT student state dict from a BERT teacher's layers.

    python scripts/extract_distilbert.py --model_type bert --model_name bert-base-uncased \
        --dump_checkpoint distillation_checkpoints/bert-base-uncased_num_layer_3.pth --num_layers 3
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import BertForMaskedLM  # noqa: E402

from scripts.extraction import (  # noqa: E402
    choose_teacher_layers,
    copy_keys,
    extraction_parser,
    load_teacher,
    parse_extraction_args,
    save_selection_report,
    save_state_dict,
)
from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("extract_distilbert")

# DistilBERT block parameter <- BERT block parameter
BLOCK_MAP = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def extract(teacher_state: dict, layers: list[int], vocab_transform: bool, name: str, prefix: str = "bert") -> dict:
    """DistilBertForMaskedLM-keyed state dict from a BertForMaskedLM state dict."""
    pairs = [
        (f"distilbert.embeddings.{w}.weight", f"{prefix}.embeddings.{w}.weight")
        for w in ("word_embeddings", "position_embeddings")
    ]
    pairs += [
        (f"distilbert.embeddings.LayerNorm.{w}", f"{prefix}.embeddings.LayerNorm.{w}") for w in ("weight", "bias")
    ]
    for student_idx, teacher_idx in enumerate(layers):
        for new, old in BLOCK_MAP.items():
            for w in ("weight", "bias"):
                pairs.append(
                    (
                        f"distilbert.transformer.layer.{student_idx}.{new}.{w}",
                        f"{prefix}.encoder.layer.{teacher_idx}.{old}.{w}",
                    )
                )
    pairs += [
        ("vocab_projector.weight", "cls.predictions.decoder.weight"),
        ("vocab_projector.bias", "cls.predictions.bias"),
    ]
    if vocab_transform:
        for w in ("weight", "bias"):
            pairs += [
                (f"vocab_transform.{w}", f"cls.predictions.transform.dense.{w}"),
                (f"vocab_layer_norm.{w}", f"cls.predictions.transform.LayerNorm.{w}"),
            ]
    out: dict = {}
    copy_keys(out, teacher_state, pairs, name)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = extraction_parser(
        "Extract a DistilBERT student from a BERT teacher.",
        ["bert"],
        "bert-base-uncased",
        "distillation_checkpoints/bert-base-uncased_num_layer_6.pth",
        "Also copy the MLM head's transform.",
    )
    args = parse_extraction_args(parser, argv)
    teacher = load_teacher(BertForMaskedLM, args.model_name, head_prefix="cls.")
    if teacher.config.model_type != "bert":
        raise UserError(f"{args.model_name} is a {teacher.config.model_type} model, not bert")
    # 7 or 8 blocks from 12: the first of the original's 9-block list, as its script did.
    layers, selection = choose_teacher_layers(args, teacher, logger, original_7_and_8=True)
    state = extract(teacher.state_dict(), layers, args.vocab_transform, args.model_name)
    save_state_dict(state, args.dump_checkpoint)
    if selection is not None:
        report = save_selection_report(selection, args, teacher.config.num_hidden_layers)
        logger.info("Scores and chosen blocks -> %s", report)
    logger.info(
        "Student of %d layers from teacher layers %s: %d tensors -> %s",
        args.num_layers,
        layers,
        len(state),
        args.dump_checkpoint,
    )
    return state


if __name__ == "__main__":
    run_cli(main)
