"""Build a RoBERTa or GPT-2 student state dict from a teacher of the same type.

    python scripts/extract.py --model_type roberta --model_name roberta-base \
        --dump_checkpoint distillation_checkpoints/roberta-base_num_layer_6.pth --vocab_transform
    python scripts/extract.py --model_type gpt2 --model_name gpt2 \
        --dump_checkpoint distillation_checkpoints/gpt2_num_layer_6.pth
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import GPT2LMHeadModel, RobertaForMaskedLM  # noqa: E402

from scripts.extraction import (  # noqa: E402
    copy_keys,
    extraction_parser,
    load_teacher,
    parse_extraction_args,
    save_state_dict,
    teacher_layers,
)
from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("extract")

ROBERTA_BLOCK = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
# GPT-2's causal-mask `attn.bias` is no longer a persistent buffer in transformers: not copied.
GPT2_BLOCK = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]


def extract_roberta(state: dict, layers: list[int], vocab_transform: bool, name: str) -> dict:
    pre = "roberta"
    pairs = [(f"{pre}.embeddings.{w}.weight",) * 2 for w in ("word_embeddings", "position_embeddings",
                                                              "token_type_embeddings")]
    pairs += [(f"{pre}.embeddings.LayerNorm.{w}",) * 2 for w in ("weight", "bias")]
    for s_idx, t_idx in enumerate(layers):
        pairs += [(f"{pre}.encoder.layer.{s_idx}.{m}.{w}", f"{pre}.encoder.layer.{t_idx}.{m}.{w}")
                  for m in ROBERTA_BLOCK for w in ("weight", "bias")]
    pairs += [("lm_head.decoder.weight",) * 2, ("lm_head.bias",) * 2]
    if vocab_transform:
        pairs += [(f"lm_head.{m}.{w}",) * 2 for m in ("dense", "layer_norm") for w in ("weight", "bias")]
    out: dict = {}
    copy_keys(out, state, pairs, name)
    return out


def extract_gpt2(state: dict, layers: list[int], name: str) -> dict:
    pre = "transformer"
    pairs = [(f"{pre}.{w}.weight",) * 2 for w in ("wte", "wpe")]
    for s_idx, t_idx in enumerate(layers):
        pairs += [(f"{pre}.h.{s_idx}.{m}.{w}", f"{pre}.h.{t_idx}.{m}.{w}") for m in GPT2_BLOCK for w in ("weight", "bias")]
    pairs += [(f"{pre}.ln_f.{w}",) * 2 for w in ("weight", "bias")] + [("lm_head.weight",) * 2]
    out: dict = {}
    copy_keys(out, state, pairs, name)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = extraction_parser(
        "Extract a roberta->roberta or gpt2->gpt2 student.", ["roberta", "gpt2"], "roberta-base",
        "distillation_checkpoints/roberta-base_num_layer_6.pth", "RoBERTa: also copy the head's transform.",
    )
    args = parse_extraction_args(parser, argv)
    if args.model_type == "roberta":
        teacher = load_teacher(RobertaForMaskedLM, args.model_name, head_prefix="lm_head.")
        n_teacher = teacher.config.num_hidden_layers
    else:
        teacher = load_teacher(GPT2LMHeadModel, args.model_name, head_prefix="lm_head.")
        n_teacher = teacher.config.n_layer
    if teacher.config.model_type != args.model_type:
        raise UserError(f"{args.model_name} is a {teacher.config.model_type} model, not {args.model_type}")
    layers = teacher_layers(n_teacher, args.num_layers, args.teacher_layers)
    state = teacher.state_dict()
    if args.model_type == "roberta":
        out = extract_roberta(state, layers, args.vocab_transform, args.model_name)
    else:
        out = extract_gpt2(state, layers, args.model_name)
    save_state_dict(out, args.dump_checkpoint)
    logger.info("Student of %d layers from teacher layers %s: %d tensors -> %s",
                args.num_layers, layers, len(out), args.dump_checkpoint)
    return out


if __name__ == "__main__":
    run_cli(main)
