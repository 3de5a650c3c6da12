"""Shared helpers of the extraction scripts: teacher loading and the choice of teacher layers."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from utils import UserError, atomic_path

# The original's picks from a 12-layer teacher.
LAYERS_UP_TO_6 = [0, 2, 4, 7, 9, 11]
LAYERS_9 = [0, 2, 3, 4, 7, 8, 9, 10, 11]


def extraction_parser(description: str, model_types: list[str], model_name: str, dump_checkpoint: str,
                      vocab_transform_help: str) -> argparse.ArgumentParser:
    """The flags both extraction scripts take (the original's, plus --teacher_layers)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model_type", default=model_types[0], choices=model_types)
    parser.add_argument("--model_name", default=model_name, help="Teacher: Hub name or local folder.")
    parser.add_argument("--dump_checkpoint", default=dump_checkpoint)
    parser.add_argument("--num_layers", type=int, default=6, help="Student layers.")
    parser.add_argument("--teacher_layers", type=int, nargs="+", default=None,
                        help="Teacher blocks to copy, one per student layer (default: the original's choice).")
    parser.add_argument("--vocab_transform", action="store_true", help=vocab_transform_help)
    return parser


def parse_extraction_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.num_layers < 1:
        raise UserError(f"--num_layers must be >= 1, got {args.num_layers}")
    return args


def teacher_layers(n_teacher: int, n_student: int, explicit: list[int] | None = None) -> list[int]:
    """Teacher block indices copied into student blocks 0..n_student-1.

    12-layer teacher: the original's lists (first n of 0,2,4,7,9,11 for up to 6 layers;
    0,2,3,4,7,8,9,10,11 for 9). Other depths: spread evenly from the first to the last block.
    """
    if explicit:
        layers = list(explicit)
    elif n_teacher == 12 and n_student <= 6:
        layers = LAYERS_UP_TO_6[:n_student]
    elif n_teacher == 12 and n_student == 9:
        layers = LAYERS_9
    else:
        layers = np.linspace(0, n_teacher - 1, n_student).round().astype(int).tolist()
    if len(layers) != n_student:
        raise UserError(f"{len(layers)} teacher layers given for a {n_student}-layer student")
    if len(set(layers)) != len(layers) or not all(0 <= i < n_teacher for i in layers):
        raise UserError(f"teacher layers {layers} must be distinct and within 0..{n_teacher - 1}")
    if n_student > n_teacher:
        raise UserError(f"a {n_student}-layer student cannot be extracted from a {n_teacher}-layer teacher")
    return layers


def load_teacher(model_class, name: str, head_prefix: str):
    """`model_class.from_pretrained(name)`, refusing a checkpoint whose LM head had to be made up.

    from_pretrained silently initialises missing weights at random; a student extracted
    from such a head would start from noise.
    """
    try:
        model, info = model_class.from_pretrained(name, output_loading_info=True)
    except OSError as e:
        raise UserError(f"cannot load {name!r}: {str(e).splitlines()[0]}") from None
    missing = [k for k in info.get("missing_keys", []) if k.startswith(head_prefix)]
    if missing:
        raise UserError(
            f"{name} has no trained LM head (missing {missing[0]}); fit one first with scripts/fit_mlm_head.py"
        )
    return model


def copy_keys(dst: dict, src: dict, pairs: list[tuple[str, str]], model_name: str) -> None:
    """dst[new] = src[old] for each (new, old); a missing key is a clear error."""
    for new, old in pairs:
        if old not in src:
            raise UserError(f"{model_name} has no parameter {old}: not a model of the expected type (or no LM head)")
        dst[new] = src[old].clone()


def save_state_dict(state: dict, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
