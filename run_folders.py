"""The run folder `dump_path/run_name`: its name, who may create, replace or continue it, and the
files that describe the run (parameters.json, git_log.json, config.json).

A run folder is created only by rank 0, marked first with `RUN_MARKER`, and replaced by
`--force` only when it is recognisably one (`is_previous_run`); every other folder is refused.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from training_config import RunContext, RunOptions, TrainingConfig, flag_values
from utils import (
    UserError,
    atomic_path,
    cannot_write_in,
    first_line,
    nearest_existing,
    require_no_symlink_loop,
    staged_files,
    write_json,
)

logger = logging.getLogger("causal_train")  # the training CLI's log lines, whichever module writes them

# Written first into every run folder: what lets --force recognise a folder as a previous run.
RUN_MARKER = ".causal_train_run"
RUN_MARKER_TEXT = "A run folder of causal_train.py (DIITO). --force may replace it.\n"
# Held (fcntl.flock) by the rank 0 that owns the run folder, until it exits: the kernel drops the lock when
# that process dies, so a crashed run never leaves the folder locked. Holds "pid hostname" for the message.
RUN_LOCK = ".causal_train.lock"
_held_locks: list[int] = []  # open descriptors of the locks this process holds (release_run_locks closes them)
# What a run folder of this code holds; a folder made before the marker existed is recognised when
# its parameters.json has the training flags and it holds nothing else.
RUN_FILES = (
    "parameters.json",
    "git_log.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "checkpoint.pth",
    "model_epoch_*.pth",
    "checkpoints",
    "log",
    RUN_MARKER,
    RUN_LOCK,
)
RUN_PARAMETER_KEYS = ("student_type", "teacher_type", "teacher_name", "data_file", "dump_path", "alpha_ce")


def default_run_name(config: TrainingConfig, options: RunOptions, world_size: int) -> str:
    """The run folder's name when --run_name is not given: the main settings, effective batch size included."""
    data = Path(options.data_file).name.split(".")[0]
    nm = Path(options.neuron_mapping).stem if options.neuron_mapping else "none"
    if config.interchange_consecutive_only:
        mode = "consec"
    elif config.interchange_masked_token_only:
        mode = "masked"
    else:
        mode = "rand"
    return (
        f"s_{options.student_type}_t_{options.teacher_type}_data_{data}_seed_{config.seed}_mlm_{config.mlm}"
        f"_ce_{config.alpha_ce}_mlm_{config.alpha_mlm}_clm_{config.alpha_clm}_mse_{config.alpha_mse}"
        f"_cos_{config.alpha_cos}"
        f"_causal-ce_{config.alpha_causal_ce}_causal-cos_{config.alpha_causal_cos}_nm_{nm}"
        f"_int-prop_{config.interchange_prop}_int-max_{config.interchange_max_token}_int-{mode}"
        f"_aug_{config.data_augment}_crossway_{config.include_crossway}"
        f"_eff-bs_{config.batch_size * config.gradient_accumulation_steps * world_size}"
    )


def on_master(context: RunContext, check: Callable[[], None]) -> None:
    """Run `check` on rank 0 alone and raise its UserError on every rank.

    Checking on every rank would race with rank 0 creating or emptying the run folder.
    """
    problem = None
    if context.is_master:
        try:
            check()
        except UserError as e:
            problem = str(e)
    if context.multi_process:
        outcome = [problem]
        dist.broadcast_object_list(outcome, src=0)  # also a barrier: past it, rank 0 is done
        problem = outcome[0]
    if problem is not None:
        raise UserError(problem)


def check_run_dir(path: Path, options: RunOptions) -> None:
    """Refuse, before any work, a run folder that this run could not create, continue or replace."""
    require_no_symlink_loop(path, "--dump_path/--run_name")
    if options.resume and not path.is_dir():
        raise UserError(f"--resume: {path} does not exist")
    if path.exists() and not options.resume:
        _check_replaceable(path, options)
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"--dump_path: {existing} is not a folder")
    problem = cannot_write_in(existing)
    if problem is not None:
        raise UserError(f"--dump_path: cannot write in {existing} ({problem})")


def _check_replaceable(path: Path, options: RunOptions) -> None:
    """A folder that exists may be replaced only with --force, and only if it is a previous run's."""
    if not options.force:
        raise UserError(f"{path} already exists: pass --force to overwrite it or --resume to continue it")
    if not is_previous_run(path):
        raise UserError(
            f"--force refuses to delete {path}: it is not a run's dump (no {RUN_MARKER} written by causal_train.py)"
        )


def run_finished(path: Path, config: TrainingConfig) -> str | None:
    """With --resume: why the run in `path` has nothing left to do, or None.

    A run is done when its train_results.json (written after its final model) records --max_steps
    optimizer steps, or --n_epoch epochs; a resume then changes nothing. A larger --max_steps or
    --n_epoch continues it.
    """
    try:
        results = json.loads((path / "train_results.json").read_text())
        steps, epochs = int(results["optimizer_steps"]), int(results["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if config.max_steps > 0 and steps >= config.max_steps:
        reached = f"--max_steps {config.max_steps} ({steps} optimizer steps)"
    elif epochs >= config.n_epoch:
        reached = f"--n_epoch {config.n_epoch} ({epochs} epochs)"
    else:
        return None
    return (
        f"--resume: {path} already reached {reached}, as its train_results.json says: nothing to do, "
        "nothing was changed; pass a larger --max_steps or --n_epoch to train on"
    )


def is_previous_run(path: Path) -> bool:
    """Whether `path` is a run folder this code wrote: it holds the marker, or (older runs) a
    parameters.json with the training flags and nothing but the files a run writes."""
    if not path.is_dir():
        return False
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            return marker.read_text() == RUN_MARKER_TEXT
        except (OSError, UnicodeDecodeError):
            return False
    try:
        params = json.loads((path / "parameters.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(params, dict) or not all(k in params for k in RUN_PARAMETER_KEYS):
        return False
    return all(any(fnmatch.fnmatch(p.name, pattern) for pattern in RUN_FILES) for p in path.iterdir())


def prepare_dump_path(path: Path, options: RunOptions, context: RunContext) -> None:
    """Create the run folder (new, or replacing a previous run with --force), or keep it (--resume)."""
    on_master(context, lambda: _claim_dump_path(path, options))


def lock_run_dir(path: Path) -> int:
    """Take the run folder's lock for this process (until it exits) and return its descriptor;
    raise a UserError naming the holder's pid when another live process holds it."""
    fd = os.open(path / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
        os.close(fd)
        raise UserError(f"{path} is in use by another run (pid {holder}); wait for it to end") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held_locks.append(fd)
    return fd


def release_run_locks() -> None:
    """Let go of every run folder this process holds: at the end of main(), so that a later run in
    the same process (tests, notebooks) can take the folder again."""
    while _held_locks:
        os.close(_held_locks.pop())


def _claim_dump_path(path: Path, options: RunOptions) -> None:
    """Take the run folder: lock it, then (unless --resume) empty it of a previous run and mark it.

    The folder itself is never deleted: emptying it under the lock leaves no moment when another
    run could create it, or take its lock, between the delete and the relock.
    """
    check_run_dir(path, options)  # again: the folder may have changed while the models loaded
    if not options.resume:
        path.mkdir(parents=True, exist_ok=True)  # a run creating it at the same moment: the lock decides
    lock_run_dir(path)  # before reading (--resume) or deleting (--force) anything in it
    if options.resume:
        return
    entries = [p for p in path.iterdir() if p.name != RUN_LOCK]
    if entries:  # checked again under the lock: another run may have made or filled it meanwhile
        _check_replaceable(path, options)
        logger.info("Overwriting %s (--force)", path)
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    with run_file(path / RUN_MARKER) as marker:
        marker.write_text(RUN_MARKER_TEXT)


def write_run_info(description: dict, context: RunContext, student, tokenizer=None) -> None:
    """parameters.json (`description`: the arguments as given, and what the run derived from them),
    git_log.json, config.json and the teacher's tokenizer (evaluation scripts then need no
    --tokenizer_name) of the run (rank 0).

    Each file is written whole or not at all: a full disk is a UserError naming the file, and the
    file as it was before (if any) is kept.
    """
    if not context.is_master:
        return
    run_dir = context.run_dir
    with run_file(run_dir / "parameters.json") as path:
        write_json(description, path)
    with run_file(run_dir / "git_log.json") as path:
        write_json(git_log(), path)
    with run_file(run_dir / "config.json") as path, atomic_path(path) as tmp:
        student.config.to_json_file(str(tmp))
    if tokenizer is not None:
        with run_file(run_dir, "the tokenizer files in"), staged_files(run_dir) as staging:
            tokenizer.save_pretrained(staging)


@contextmanager
def run_file(path: Path, what: str = "") -> Iterator[Path]:
    """Yield `path`; an OSError while writing it (disk full, quota) becomes a UserError naming `what` `path`."""
    try:
        yield path
    except OSError as e:
        raise UserError(
            f"cannot write {what + ' ' if what else ''}{path}: {e.strerror or first_line(e)}; "
            "the files written before are kept"
        ) from None


def run_description(config: TrainingConfig, options: RunOptions, context: RunContext) -> dict:
    """Every argument as the user gave it, plus `run`: the context the run derived from them."""
    return {**flag_values(config, options), "run": {"run_name": context.run_dir.name, **context.describe()}}


def git_log() -> dict:
    """Repository id, commit and branch of the code that runs (recorded, not required): the
    repository this file lives in, wherever the run folder is."""
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        try:
            branch = str(repo.active_branch)
        except TypeError:
            branch = "(detached HEAD)"
        return {"repo_id": str(repo), "repo_sha": str(repo.head.object.hexsha), "repo_branch": branch}
    except Exception as e:  # no git executable, not a repository, empty repository...
        return {"repo_id": None, "repo_sha": None, "repo_branch": None, "error": f"{type(e).__name__}: {e}"}
