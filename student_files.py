"""The student's files in a run folder: its state dicts (`.pth`, `pytorch_model.bin`), the
`checkpoint-<micro-batch>/` folders and the final `from_pretrained` folder (the run folder itself).

Every file follows the umask, the weights `save_pretrained` writes through a private temporary
file included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from checkpointing import save_atomically
from utils import follow_umask


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """The student's state dict, written atomically (checkpoint.pth, model_epoch_<n>.pth, pytorch_model.bin)."""
    save_atomically(weights, path)


def save_model_folder(
    student: Any, tokenizer: Any, run_dir: Path, micro_batch: int, keep: int, weights: dict | None = None
) -> None:
    """checkpoint-<micro_batch>/: config, weights and (if given) tokenizer, loadable with from_pretrained.

    weights: the student's full state dict (default its `state_dict()`; a sharded student's is gathered
    first, `sharding.full_model_state`). Written as a hidden folder, then renamed; only the newest
    `keep` folders are kept.
    """
    name = f"checkpoint-{micro_batch}"
    final, tmp = run_dir / name, run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp, state_dict=None if weights is None else dict(weights))  # it empties the dict
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:  # a full disk: no half-written hidden folder left behind, earlier folders kept
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.iterdir():
        follow_umask(path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    folders = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    for old in folders[:-keep]:
        shutil.rmtree(old)


def save_final(student: Any, run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """The run folder as a `from_pretrained` folder, and `pytorch_model.bin` (state dict, original name).

    weights: the student's full state dict (`student.state_dict()`, or `sharding.full_model_state`).
    """
    student.config.save_pretrained(run_dir)
    before = set(run_dir.iterdir())
    student.save_pretrained(run_dir, state_dict=dict(weights))  # it empties the dict it gets
    # save_pretrained writes the weights through a private temporary file (mode 0600): give
    # them the permissions every other output has (the umask's).
    for path in set(run_dir.iterdir()) - before | {run_dir / "model.safetensors"}:
        if path.is_file():
            follow_umask(path)
    save_weights(weights, run_dir / "pytorch_model.bin")
