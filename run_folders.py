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
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from training_config import RunContext, RunOptions, TrainingConfig, flag_values
from utils import UserError, cannot_write_in, nearest_existing, write_json

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
    if options.resume and not path.is_dir():
        raise UserError(f"--resume: {path} does not exist")
    if path.exists() and not options.resume:
        if not options.force:
            raise UserError(f"{path} already exists: pass --force to overwrite it or --resume to continue it")
        if not is_previous_run(path):
            raise UserError(
                f"--force refuses to delete {path}: it is not a run's dump (no {RUN_MARKER} written by causal_train.py)"
            )
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"--dump_path: {existing} is not a folder")
    problem = cannot_write_in(existing)
    if problem is not None:
        raise UserError(f"--dump_path: cannot write in {existing} ({problem})")


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
    check_run_dir(path, options)  # again: the folder may have changed while the models loaded
    if path.is_dir():
        lock_run_dir(path)  # before reading (--resume) or deleting (--force) anything in it
    if options.resume:
        return
    if path.exists():
        logger.info("Overwriting %s (--force)", path)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    lock_run_dir(path)
    (path / RUN_MARKER).write_text(RUN_MARKER_TEXT)


def write_run_info(description: dict, context: RunContext, student) -> None:
    """parameters.json (`description`: the arguments as given, and what the run derived from them),
    git_log.json and config.json of the run (rank 0)."""
    if context.is_master:
        write_json(description, context.run_dir / "parameters.json")
        write_json(git_log(), context.run_dir / "git_log.json")
        student.config.to_json_file(str(context.run_dir / "config.json"))


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
