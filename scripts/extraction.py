"""Shared helpers of the extraction scripts: flags, the choice of teacher blocks, copying and saving."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from transformers import AutoTokenizer

from architectures import Architecture, ExtractionLayout
from checkpointing import save_atomically
from layer_selection import MEASURED, Selection, select_layers
from model_files import TOKENIZER_FILES as MODEL_TOKENIZER_FILES
from model_files import check_model_folder, check_tokenizer_files, check_tokenizer_fits, weights_file, weights_problem
from utils import (
    UserError,
    cannot_write_in,
    first_line,
    nearest_existing,
    replacing_folder,
    require_file,
    require_no_symlink_loop,
    write_json,
)

# The original's picks from a 12-layer teacher.
LAYERS_UP_TO_6 = [0, 2, 4, 7, 9, 11]
LAYERS_9 = [0, 2, 3, 4, 7, 8, 9, 10, 11]
DEFAULT_NUM_LAYERS = 6
LAYER_SELECTIONS = ("even", "original") + MEASURED
DEFAULT_CALIBRATION_SEQUENCES = 128
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
    parser.add_argument(
        "--layer_selection",
        default=None,
        choices=LAYER_SELECTIONS,
        help="How the teacher blocks are chosen when --teacher_layers is not given: even (spread evenly, "
        "keeping the first and the last), original (the original's list from 12 blocks), angular (drop the "
        "run of blocks that changes the hidden states least, Gromov et al. 2024) or block_influence (keep "
        "the blocks that change them most, ShortGPT); the last two read --calibration_file. Default: the "
        "original's list where it has one, else even.",
    )
    parser.add_argument(
        "--calibration_file",
        default=None,
        help="Binarized corpus (*.pickle or *.tokens.npy) that angular and block_influence measure the teacher on.",
    )
    parser.add_argument(
        "--calibration_sequences",
        type=int,
        default=DEFAULT_CALIBRATION_SEQUENCES,
        metavar="N",
        help=f"The first N sequences of --calibration_file are measured (default {DEFAULT_CALIBRATION_SEQUENCES}).",
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
    _check_layer_selection(args)
    check_writable_file(args.dump_checkpoint, "--dump_checkpoint")
    if args.layer_selection in MEASURED:
        check_writable_file(str(selection_report_path(args.dump_checkpoint)), "--dump_checkpoint")
    if getattr(args, "dump_folder", None) is not None:
        check_writable_folder(args.dump_folder, "--dump_folder")
    return args


def _check_layer_selection(args: argparse.Namespace) -> None:
    if args.calibration_sequences < 1:
        raise UserError(f"--calibration_sequences must be >= 1, got {args.calibration_sequences}")
    if args.layer_selection in MEASURED:
        if args.calibration_file is None:
            raise UserError(f"--layer_selection {args.layer_selection} needs --calibration_file (a binarized corpus)")
        require_file(args.calibration_file, "--calibration_file")
    elif args.calibration_file is not None:
        raise UserError(
            "--calibration_file is only read by --layer_selection angular or block_influence "
            f"(got {args.layer_selection or 'the default choice'})"
        )


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
    n_teacher: int,
    n_student: int,
    explicit: list[int] | None = None,
    original_7_and_8: bool = False,
    method: str | None = None,
) -> list[int]:
    """Teacher block indices copied into student blocks 0..n_student-1.

    12-block teacher: the original's lists (first n of 0,2,4,7,9,11 for up to 6 blocks;
    0,2,3,4,7,8,9,10,11 for 9, and its first 7 or 8 with `original_7_and_8`, which the original's
    BERT -> DistilBERT script used). Otherwise spread evenly, keeping the first and the last block.
    method "even" always spreads evenly; "original" refuses sizes the original has no list for.
    `explicit` (--teacher_layers) wins over both.
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
    elif method != "even" and n_teacher == 12 and n_student <= 6:
        layers = LAYERS_UP_TO_6[:n_student]
    elif method != "even" and n_teacher == 12 and (n_student == 9 or (original_7_and_8 and n_student in (7, 8))):
        layers = LAYERS_9[:n_student]
    elif method == "original":
        sizes = "1-9" if original_7_and_8 else "1-6 and 9"
        raise UserError(
            f"--layer_selection original: the original has no list for {n_student} of {n_teacher} blocks "
            f"(only {sizes} of 12); use --layer_selection even, angular or block_influence, or --teacher_layers"
        )
    else:
        layers = np.linspace(0, n_teacher - 1, n_student).round().astype(int).tolist()
    if len(layers) != n_student:
        raise UserError(f"{len(layers)} teacher layers given for a {n_student}-layer student")
    assert len(set(layers)) == len(layers) and layers == sorted(layers), layers
    return layers


def choose_teacher_layers(
    args: argparse.Namespace, teacher, log: logging.Logger, original_7_and_8: bool = False
) -> tuple[list[int], Selection | None]:
    """The teacher blocks the flags ask for, and the measurement behind them (None unless measured).

    A measured choice logs every block's score and the blocks kept.
    """
    n_teacher = teacher.config.num_hidden_layers
    if args.teacher_layers is not None or args.layer_selection not in MEASURED:
        if args.teacher_layers is not None and args.layer_selection is not None:
            log.warning("--teacher_layers given: --layer_selection %s is not used", args.layer_selection)
        layers = teacher_layers(n_teacher, args.num_layers, args.teacher_layers, original_7_and_8, args.layer_selection)
        return layers, None
    selection = select_layers(
        teacher, args.layer_selection, args.num_layers, args.calibration_file, args.calibration_sequences
    )
    if selection.n_sequences < args.calibration_sequences:
        log.warning(
            "--calibration_file %s has only %d non-empty sequences (--calibration_sequences %d): all are used",
            args.calibration_file,
            selection.n_sequences,
            args.calibration_sequences,
        )
    log.info(
        "%s on %d sequences (%d tokens) of %s, %s:",
        selection.method,
        selection.n_sequences,
        selection.n_tokens,
        args.calibration_file,
        selection.meaning,
    )
    index = "start block" if selection.method == "angular" else "block"
    for i, score in enumerate(selection.scores):
        log.info("  %s %d: %.6f", index, i, score)
    log.info("Chosen teacher blocks: %s", selection.layers)
    return selection.layers, selection


def selection_report_path(dump_checkpoint: str) -> Path:
    """`<checkpoint without suffix>.layer_selection.json`, beside the checkpoint."""
    path = Path(dump_checkpoint)
    return path.with_name(path.stem + ".layer_selection.json")


def save_selection_report(selection: Selection, args: argparse.Namespace, n_teacher: int) -> Path:
    """Write the measured scores and the chosen blocks beside the checkpoint (atomically); returns its path."""
    report = {
        "method": selection.method,
        "teacher": args.model_name,
        "teacher_blocks": n_teacher,
        "score": selection.meaning,
        "scores": selection.scores,
        "teacher_layers": selection.layers,
        "calibration_file": args.calibration_file,
        "calibration_sequences": selection.n_sequences,
        "calibration_tokens": selection.n_tokens,
    }
    path = selection_report_path(args.dump_checkpoint)
    try:
        write_json(report, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def load_teacher(model_class, name: str, head_prefix: str, with_tokenizer: bool = False):
    """`model_class.from_pretrained(name)`, refusing a checkpoint whose LM head had to be made up.

    from_pretrained silently initialises missing weights at random; a student extracted
    from such a head would start from noise. A local folder's files are checked first (`model_files`:
    config.json, the weights' headers); a pickled .bin is read as data only. With `with_tokenizer`
    (the tokenizer files are copied into --dump_folder), tokenizer files the folder holds must load
    and fit the model.
    """
    require_no_symlink_loop(name, "--model_name")
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.exists(name)  # else a Hub id
    folder = Path(name).expanduser() if local else None
    if folder is not None:
        if not folder.is_dir():
            raise UserError(f"--model_name: the folder {name} does not exist (a Hub id is `name` or `org/name`)")
        if not (folder / "config.json").is_file():
            raise UserError(f"--model_name: {name} has no config.json (save the teacher with save_pretrained)")
        try:
            check_model_folder(folder, None, model_class.config_class)
            if with_tokenizer and any((folder / f).is_file() for f in MODEL_TOKENIZER_FILES):
                check_tokenizer_files(folder, "")
        except UserError as e:
            raise UserError(f"--model_name: {e}") from None
    try:
        model, info = model_class.from_pretrained(name, output_loading_info=True, weights_only=True)
    except Exception as e:  # many types (OSError, SafetensorError, UnpicklingError, ...) for one cause: bad files
        problem = weights_problem(weights_file(folder) if folder else None, e) or first_line(e)
        raise UserError(f"cannot load {name!r}: {problem}") from None
    missing = [k for k in info.get("missing_keys", []) if k.startswith(head_prefix)]
    if missing:
        raise UserError(
            f"{name} has no trained LM head (missing {missing[0]}); fit one first with scripts/fit_mlm_head.py"
        )
    if with_tokenizer and folder is not None and any((folder / f).is_file() for f in MODEL_TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # many types for one cause: the tokenizer files cannot be read
            raise UserError(f"--model_name: cannot load the tokenizer in {folder}: {first_line(e)}") from None
        try:
            check_tokenizer_fits(tokenizer, model.config, name)
        except UserError as e:
            raise UserError(f"--model_name: {e}") from None
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
    with replacing_folder(dst, replace=False) as tmp:  # dst was checked empty before the teacher was loaded
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
    return missing


def _probe(folder: Path, flag: str, target: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"{flag} {target}: {folder} is not a folder")
    problem = cannot_write_in(folder)
    if problem is not None:
        raise UserError(f"{flag} {target}: cannot write in {folder}: {problem}")


def check_writable_file(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written (a folder, under a file, unwritable folder, a loop of links)."""
    require_no_symlink_loop(path, flag)
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder, not a file")
    _probe(nearest_existing(p.parent), flag, p)


def check_writable_folder(path: str, flag: str) -> None:
    """Refuse an output folder that exists and is not empty, or cannot be created or written."""
    require_no_symlink_loop(path, flag)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder")
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"{flag} {p} already exists and is not empty")
    _probe(nearest_existing(p) if p.is_dir() else nearest_existing(p.parent), flag, p)
