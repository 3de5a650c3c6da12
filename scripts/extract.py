"""Build a student from a teacher of the same family: RoBERTa, GPT-2, or a Llama-style decoder.

    python scripts/extract.py --model_type roberta --model_name roberta-base \
        --dump_checkpoint distillation_checkpoints/roberta-base_num_layer_6.pth --vocab_transform
    python scripts/extract.py --model_type gpt2 --model_name gpt2 \
        --dump_checkpoint distillation_checkpoints/gpt2_num_layer_6.pth
    python scripts/extract.py --model_type llama --model_name models/SmolLM2-135M --num_layers 10 \
        --dump_checkpoint distillation_checkpoints/smollm2-135m_num_layer_10.pth \
        --dump_folder distillation_checkpoints/smollm2-135m_num_layer_10

The student keeps the teacher's embeddings, final norm and LM head (tied or not) and the chosen
teacher blocks, in order. What to copy is the family's extraction layout in architectures.py.
Blocks can be chosen by measured importance on a binarized corpus (layer_selection.py):

    python scripts/extract.py --model_type llama --model_name models/SmolLM2-135M --num_layers 20 \
        --layer_selection block_influence --calibration_file data/binarized_text.valid.smollm2.pickle \
        --dump_checkpoint distillation_checkpoints/smollm2-135m_bi_20.pth
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from architectures import ARCHITECTURES  # noqa: E402
from scripts.extraction import (  # noqa: E402
    choose_teacher_layers,
    extract_by_layout,
    extraction_parser,
    load_teacher,
    parse_extraction_args,
    save_selection_report,
    save_state_dict,
    save_student_folder,
)
from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("extract")

MODEL_TYPES = [name for name, row in ARCHITECTURES.items() if row.extraction is not None]


def main(argv: list[str] | None = None) -> dict:
    parser = extraction_parser(
        f"Extract a same-family student ({', '.join(MODEL_TYPES)}).",
        MODEL_TYPES,
        "roberta-base",
        "distillation_checkpoints/roberta-base_num_layer_6.pth",
        "RoBERTa: also copy the head's transform.",
        dump_folder=True,
    )
    args = parse_extraction_args(parser, argv)
    row = ARCHITECTURES[args.model_type]
    teacher = load_teacher(
        row.lm_cls(), args.model_name, head_prefix="lm_head.", with_tokenizer=args.dump_folder is not None
    )
    if teacher.config.model_type != args.model_type:
        raise UserError(f"{args.model_name} is a {teacher.config.model_type} model, not {args.model_type}")
    layers, selection = choose_teacher_layers(args, teacher, logger)
    out = extract_by_layout(teacher.state_dict(), row.extraction, layers, args.model_name, args.vocab_transform)
    save_state_dict(out, args.dump_checkpoint)
    if selection is not None:
        report = save_selection_report(selection, args, teacher.config.num_hidden_layers)
        logger.info("Scores and chosen blocks -> %s", report)
    logger.info(
        "Student of %d layers from teacher layers %s: %d tensors -> %s",
        args.num_layers,
        layers,
        len(out),
        args.dump_checkpoint,
    )
    if args.dump_folder is not None:
        missing = save_student_folder(row, teacher, out, layers, args.model_name, args.dump_folder)
        if missing:
            logger.warning("Student folder: %d tensors left at their random init (%s...)", len(missing), missing[:3])
        logger.info("Student folder (from_pretrained) -> %s", args.dump_folder)
    return out


if __name__ == "__main__":
    run_cli(main)
