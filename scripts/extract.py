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
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from architectures import ARCHITECTURES  # noqa: E402
from scripts.extraction import (  # noqa: E402
    extract_by_layout,
    extraction_parser,
    load_teacher,
    parse_extraction_args,
    save_state_dict,
    save_student_folder,
    teacher_layers,
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
    teacher = load_teacher(row.lm_cls(), args.model_name, head_prefix="lm_head.")
    if teacher.config.model_type != args.model_type:
        raise UserError(f"{args.model_name} is a {teacher.config.model_type} model, not {args.model_type}")
    layers = teacher_layers(teacher.config.num_hidden_layers, args.num_layers, args.teacher_layers)
    out = extract_by_layout(teacher.state_dict(), row.extraction, layers, args.model_name, args.vocab_transform)
    save_state_dict(out, args.dump_checkpoint)
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
