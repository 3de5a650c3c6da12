"""Shared helpers of the extraction scripts: flags, the choice of teacher blocks, copying and saving."""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from architectures import Architecture, ExtractionLayout
from checkpointing import save_atomically
from utils import UserError, cannot_write_in, nearest_existing

# The original's picks from a 12-layer teacher.
LAYERS_UP_TO_6 = [0, 2, 4, 7, 9, 11]
LAYERS_9 = [0, 2, 3, 4, 7, 8, 9, 10, 11]
DEFAULT_NUM_LAYERS = 6
# Tokenizer files copied from a local teacher folder into a student folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def extraction_parser(
    description: str,
    model_types: list[str],
    model_name: str,
    dump_checkpoint: str,
    vocab_transform_help: str,
    dump_folder: bool = False,
) -> argparse.ArgumentParser:
    """The flags the extraction scripts take (the original's, plus --teacher_layers and --dump_folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model_type", default=model_types[0], choices=model_types)
    parser.add_argument("--model_name", default=model_name, help="Teacher: Hub name or local folder.")
    parser.add_argument("--dump_checkpoint", default=dump_checkpoint, help="Student state dict (.pth) to write.")
    parser.add_argument(
        "--num_layers",
        type=int,
        default=None,
        help=f"Student blocks (default: {DEFAULT_NUM_LAYERS}, or the length of --teacher_layers).",
    )
    parser.add_argument(
        "--teacher_layers",
        "--layers",
        nargs="+",
        default=None,
        metavar="BLOCK",
        help="Teacher blocks to copy, increasing, one per student block: '0 3 5' or '0,3,5' "
        "(default: the original's choice from 12 blocks, else evenly spaced keeping the "
        "first and the last).",
    )
    parser.add_argument("--vocab_transform", action="store_true", help=vocab_transform_help)
    if dump_folder:
        parser.add_argument(
            "--dump_folder",
            default=None,
            help="Also write the student as a from_pretrained folder (config, weights, and the "
            "teacher's tokenizer if its folder has one).",
        )
    return parser


def parse_extraction_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check everything that needs no teacher, outputs included, before the teacher is loaded."""
    args = parser.parse_args(argv)
    if args.teacher_layers is not None:
        args.teacher_layers = _layer_list(args.teacher_layers)
        if args.num_layers is None:
            args.num_layers = len(args.teacher_layers)
    if args.num_layers is None:
        args.num_layers = DEFAULT_NUM_LAYERS
    if args.num_layers < 1:
        raise UserError(f"--num_layers must be >= 1, got {args.num_layers}")
    if args.teacher_layers is not None and len(args.teacher_layers) != args.num_layers:
        raise UserError(f"{len(args.teacher_layers)} teacher layers given for a {args.num_layers}-layer student")
    check_writable_file(args.dump_checkpoint, "--dump_checkpoint")
    if getattr(args, "dump_folder", None) is not None:
        check_writable_folder(args.dump_folder, "--dump_folder")
    return args


def _layer_list(items: list[str]) -> list[int]:
    """'0 3 5' / '0,3,5' items -> [0, 3, 5]: integers, no repeats, increasing."""
    layers = []
    for text in (part for item in items for part in item.split(",") if part.strip()):
        if not text.strip().isdigit():
            raise UserError(f"--teacher_layers: {text.strip()!r} is not a block index (use e.g. '0,3,5')")
        layers.append(int(text))
    if not layers:
        raise UserError("--teacher_layers: no block given")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise UserError(f"--teacher_layers: block {repeated[0]} is listed more than once in {layers}")
    if layers != sorted(layers):
        raise UserError(f"--teacher_layers must be increasing (student blocks keep the teacher's order): got {layers}")
    return layers


def teacher_layers(
    n_teacher: int, n_student: int, explicit: list[int] | None = None, original_7_and_8: bool = False
) -> list[int]:
    """Teacher block indices copied into student blocks 0..n_student-1.

    12-block teacher: the original's lists (first n of 0,2,4,7,9,11 for up to 6 blocks;
    0,2,3,4,7,8,9,10,11 for 9, and its first 7 or 8 with `original_7_and_8`, which the original's
    BERT -> DistilBERT script used). Otherwise spread evenly, keeping the first and the last block.
    """
    if explicit:
        layers = list(explicit)
        outside = [i for i in layers if not 0 <= i < n_teacher]
        if outside:
            raise UserError(
                f"--teacher_layers: block {outside[0]} is out of range for a {n_teacher}-block teacher "
                f"(0..{n_teacher - 1})"
            )
    elif n_student > n_teacher:
        raise UserError(f"cannot extract {n_student} layers from {n_teacher}: the teacher has {n_teacher} blocks")
    elif n_teacher == 12 and n_student <= 6:
        layers = LAYERS_UP_TO_6[:n_student]
    elif n_teacher == 12 and (n_student == 9 or (original_7_and_8 and n_student in (7, 8))):
        layers = LAYERS_9[:n_student]
    else:
        layers = np.linspace(0, n_teacher - 1, n_student).round().astype(int).tolist()
    if len(layers) != n_student:
        raise UserError(f"{len(layers)} teacher layers given for a {n_student}-layer student")
    assert len(set(layers)) == len(layers) and layers == sorted(layers), layers
    return layers


def load_teacher(model_class, name: str, head_prefix: str):
    """`model_class.from_pretrained(name)`, refusing a checkpoint whose LM head had to be made up.

    from_pretrained silently initialises missing weights at random; a student extracted
    from such a head would start from noise.
    """
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.exists(name)  # else a Hub id
    if local and not Path(name).expanduser().is_dir():
        raise UserError(f"--model_name: the folder {name} does not exist (a Hub id is `name` or `org/name`)")
    if local and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"--model_name: {name} has no config.json (save the teacher with save_pretrained)")
    try:
        model, info = model_class.from_pretrained(name, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
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


def extract_by_layout(
    state: dict, layout: ExtractionLayout, layers: list[int], name: str, vocab_transform: bool = False
) -> dict:
    """Student state dict (same family): embeddings, the chosen blocks renumbered 0.., final norm, head.

    A tied head (`lm_head.weight` is the embedding matrix) is copied under both keys, as the teacher's
    state dict holds it; an untied one is its own tensor.
    """
    out: dict = {}

    def copy_prefixes(prefixes: tuple[str, ...]) -> None:
        for prefix in prefixes:
            keys = [k for k in state if k == prefix or k.startswith(prefix + ".")]
            if not keys:
                raise UserError(f"{name} has no parameter {prefix}: not a model of the expected type (or no LM head)")
            for k in keys:
                out[k] = state[k].clone()

    copy_prefixes(layout.embeddings)
    block = re.compile(re.escape(layout.blocks) + r"\.(\d+)\.(.+)$")
    by_block: dict[int, list[tuple[str, str]]] = {}
    for k in state:
        m = block.match(k)
        if m:
            by_block.setdefault(int(m.group(1)), []).append((m.group(2), k))
    for s_idx, t_idx in enumerate(layers):
        if t_idx not in by_block:
            raise UserError(f"{name} has no block {layout.blocks}.{t_idx}")
        for rest, k in by_block[t_idx]:
            out[f"{layout.blocks}.{s_idx}.{rest}"] = state[k].clone()
    copy_prefixes(layout.final_norm + layout.head + (layout.head_transform if vocab_transform else ()))
    return out


def student_config(teacher_config, layers: list[int]):
    """The teacher's config with `len(layers)` blocks (per-block lists such as `layer_types` follow the blocks)."""
    config = copy.deepcopy(teacher_config)
    n_teacher = config.num_hidden_layers
    config.num_hidden_layers = len(layers)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_teacher and key.startswith("layer_"):
            setattr(config, key, [value[i] for i in layers])
    return config


def save_state_dict(state: dict, path: str) -> None:
    """Write `state` atomically (UserError naming the file if the write fails: the previous file is kept)."""
    save_atomically(state, Path(path))


def save_student_folder(
    row: Architecture, teacher, state: dict, layers: list[int], teacher_name: str, folder: str
) -> list[str]:
    """Write a from_pretrained folder for the extracted student; returns the student keys left at init.

    The folder is written next to its destination and renamed into place, so a failure leaves nothing.
    """
    config = student_config(teacher.config, layers)
    student = row.lm_cls()(config)
    result = student.load_state_dict(state, strict=False)
    tied = getattr(student, "_tied_weights_keys", None) or {}
    missing = [k for k in result.missing_keys if k not in set(tied)]
    assert not result.unexpected_keys, result.unexpected_keys
    dst = Path(folder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        try:
            student.save_pretrained(tmp)
        except (OSError, SafetensorError) as e:
            raise UserError(
                f"--dump_folder {dst}: cannot write the student: {' '.join(str(e).split())}; nothing was written"
            ) from None
        src = Path(teacher_name)
        if src.is_dir():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy(src / name, tmp / name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; follow the umask like other outputs
        if dst.is_dir():
            dst.rmdir()  # checked empty before the teacher was loaded
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return missing


def _probe(folder: Path, flag: str, target: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"{flag} {target}: {folder} is not a folder")
    problem = cannot_write_in(folder)
    if problem is not None:
        raise UserError(f"{flag} {target}: cannot write in {folder}: {problem}")


def check_writable_file(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written (a folder, under a file, unwritable folder)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder, not a file")
    _probe(nearest_existing(p.parent), flag, p)


def check_writable_folder(path: str, flag: str) -> None:
    """Refuse an output folder that exists and is not empty, or cannot be created or written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder")
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"{flag} {p} already exists and is not empty")
    _probe(nearest_existing(p) if p.is_dir() else nearest_existing(p.parent), flag, p)
