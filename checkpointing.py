"""Training states: what a run saves to continue exactly, and how `--resume` reads it back.

Every `--checkpoint_interval` micro-batches each process writes
``checkpoints/state_{micro-batch:010d}_rank{rank}.pth`` atomically. Every rank's file holds its RNG
states, the counters (`TrainState`), the settings a resumed run must share and, mid-accumulation,
its partial gradients; rank 0's also holds the shared part (student, optimizer, scheduler, scaler).

States hold only tensors and plain Python values (the numpy RNG state is stored as a tensor and
ints), so they are read with ``torch.load(weights_only=True)``: loading one never runs code. A file
that holds anything else (a pickle payload, another program's objects) is refused; a truncated or
unreadable newest state makes `--resume` fall back to the newest intact state all ranks have.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import Sampler

from grouped_batch_sampler import GroupedBatchSampler
from token_store import TokenSequences
from training_config import RunContext, TrainingConfig
from utils import UserError, atomic_path, first_line

logger = logging.getLogger(__name__)

STATE_DIR = "checkpoints"
# Settings a resumed run must share with the run that saved the state: the batches, their order and
# the random streams follow from them (and from the corpus, compared by fingerprint).
# --fsdp too: its states hold each rank's gradient shard and a name-keyed optimizer state.
RESUME_MUST_MATCH = ("world_size", "batch_size", "gradient_accumulation_steps", "seed", "group_by_size", "fsdp")
_RANK_KEYS = {"grads", "rng", "state", "run", "global_rank"}
_SHARED_KEYS = {"student", "optimizer", "scheduler", "scaler"}


@dataclass
class TrainState:
    """Counters of a run; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    n_total_iter: int = 0  # micro-batches since the start (TensorBoard step, as in the original)
    n_optim_steps: int = 0  # optimizer steps, skipped ones included (the scheduler counts them too)
    n_skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    window_skipped: bool = False  # the current accumulation window saw a non-finite loss
    n_tokens: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    last_loss: dict[str, float] = field(default_factory=dict)


# --- file names and writing ------------------------------------------------------------------------


def state_file_name(n_total_iter: int, global_rank: int) -> str:
    return f"state_{n_total_iter:010d}_rank{global_rank}.pth"


def saved_steps(folder: Path, global_rank: int) -> list[int]:
    """Micro-batch counts at which this rank has a state file in `folder`, ascending.

    Partial writes are hidden temporary files (`.state_...tmp`) and never match.
    """
    return sorted(int(path.name.split("_")[1]) for path in folder.glob(f"state_*_rank{global_rank}.pth"))


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, synced to disk, then renamed onto `path`.

    A kill or a crash at any point leaves either the previous file or the complete new one; a write
    that fails (disk full, file size limit) is a UserError naming the file and the cause.
    """
    writer = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError without the cause: the writer kept it.
        cause = writer.error if writer is not None and writer.error is not None else e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause)
        raise UserError(f"cannot write {path}: {reason}; the previous {path.name} (if any) is kept") from None


class _RecordingWriter:
    """A binary file that remembers the OSError of a failed write (torch.save hides it)."""

    def __init__(self, f):
        self.f, self.error = f, None
        self.name = f.name  # what the file is, as for the file itself

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


class SkipBatches(Sampler[list[int]]):
    """A batch sampler that drops the first `skip` batches of an epoch (resuming mid-epoch)."""

    def __init__(self, batch_sampler: GroupedBatchSampler, skip: int):
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self):
        for i, b in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield b

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


# --- what must match ---------------------------------------------------------------------------------


def corpus_fingerprint(store: TokenSequences, blocks: int = 4096, block_len: int = 64) -> str:
    """A hash of a corpus: every sequence boundary, and `blocks` runs of `block_len` tokens at evenly
    spaced positions.

    Cheap on a memory-mapped corpus of billions of tokens: it reads the offsets and a few thousand
    pages of tokens. Any change of a sequence's length is caught, and so is another corpus with the
    same lengths; an edit of a few tokens between the sampled blocks is not.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(store.offsets, dtype=np.int64).tobytes())
    flat = store.flat
    block_len = min(block_len, len(flat))
    starts = np.unique(np.linspace(0, len(flat) - block_len, num=blocks).astype(np.int64))
    sample = flat[(starts[:, None] + np.arange(block_len)).ravel()]
    h.update(np.ascontiguousarray(sample, dtype=np.int64).tobytes())
    return h.hexdigest()


def run_settings(config: TrainingConfig, world_size: int, n_sequences: int, corpus: str) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state; corpus: its fingerprint."""
    settings = {k: getattr(config, k) for k in RESUME_MUST_MATCH if k != "world_size"}
    return {"world_size": world_size, **settings, "n_sequences": n_sequences, "corpus": corpus}


# --- saving --------------------------------------------------------------------------------------------


def rng_state(device: torch.device, generator: torch.Generator, mapping_rng: random.Random) -> dict[str, Any]:
    """Every random stream of this rank, as tensors and plain Python values: the global ones, and the
    step's `generator` (positions, MLM corruption) and `mapping_rng` (mapping entries) on `device`."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state(),
        "mapping": mapping_rng.getstate(),
    }


def restore_rng(
    rng: dict[str, Any], device: torch.device, generator: torch.Generator, mapping_rng: random.Random
) -> None:
    """Set every random stream `rng_state` saved."""
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    generator.set_state(rng["generator"])
    mapping_rng.setstate(rng["mapping"])


def training_state(
    *,
    counters: TrainState,
    rng: dict[str, Any],
    run: dict[str, Any],
    global_rank: int,
    grads: list[torch.Tensor | None] | None,
    student: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """One rank's state file: its `rng_state`, counters, `run_settings` and, mid-accumulation, its
    `grads` (one per student parameter, not yet all-reduced; None otherwise).

    Every rank's holds its own random streams (masking and positions are drawn per rank, dropout
    differs with the data) and partial gradients: both are needed to continue exactly. Rank 0's
    also holds what the ranks share (student, optimizer, scheduler, grad scaler), written once
    rather than once per rank. student, optimizer: their state dicts (full ones: `sharding`).
    """
    out = {"grads": grads, "rng": rng, "state": asdict(counters), "run": run, "global_rank": global_rank}
    if global_rank == 0:
        out.update(
            student=student,
            optimizer=optimizer,
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
        )
    return out


def save_state(state: dict[str, Any], context: RunContext, save_total_limit: int) -> None:
    """Write this rank's `training_state` atomically; once every rank has, keep the newest `save_total_limit`."""
    folder, rank = context.run_dir / STATE_DIR, context.global_rank
    save_atomically(state, folder / state_file_name(state["state"]["n_total_iter"], rank))
    if context.multi_process:
        dist.barrier()  # a kill before every rank has the new state must leave a common older one
    for old in sorted(folder.glob(f"state_*_rank{rank}.pth"))[:-save_total_limit]:
        old.unlink()
    for partial in folder.glob(f".state_*_rank{rank}.pth.*.tmp"):  # left by a killed write
        partial.unlink()


# --- loading -------------------------------------------------------------------------------------------


class UnreadableState(Exception):
    """A state file that cannot be read: truncated, empty, or not a torch file."""


def load_state_file(path: Path, rank: int, mmap: bool = False) -> dict[str, Any]:
    """Read one state file without running code; `mmap`: its tensors are mapped, read only when used.

    Raises UnreadableState for a damaged file, and UserError for a file that reads but is not a
    training state of this code: a pickle payload (objects beyond tensors and plain values) or
    another program's file.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(
                f"--resume: refused {path}: it holds objects a training state never has (tampered, or not "
                "written by causal_train.py); nothing in it was run"
            ) from None
        raise UnreadableState(f"{path}: {first_line(e)}") from None
    except Exception as e:  # truncated zip, bad CRC, empty or foreign bytes
        message = first_line(e)
        raise UnreadableState(f"{path}: {message}") from None
    needed = _RANK_KEYS | (_SHARED_KEYS if rank == 0 else set())
    if not isinstance(obj, dict) or not needed <= set(obj) or obj["global_rank"] != rank:
        raise UserError(f"--resume: refused {path}: it is not a rank-{rank} training state of causal_train.py")
    return obj


def _read_step(folder: Path, step: int, rank: int, mmap: bool) -> tuple[dict, dict] | str | None:
    """(own, shared) states of `step`; None if a file is damaged; a message if one must be refused.

    mmap (--fsdp): the other ranks map rank 0's file into memory (one page-cache copy per node); under
    DDP they copy it, as each keeps a full student and optimizer anyway.
    """
    try:
        own = load_state_file(folder / state_file_name(step, rank), rank)
        shared = own if rank == 0 else load_state_file(folder / state_file_name(step, 0), 0, mmap=mmap)
    except UnreadableState as e:
        logger.warning("--resume: cannot read %s; trying an older state", e)
        return None
    except UserError as e:
        return str(e)
    except FileNotFoundError as e:
        return f"--resume: cannot read {e.filename}: is {folder} shared by all nodes?"
    return own, shared


def read_resume_state(context: RunContext, settings: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The newest state that every rank has saved and can read (UserError if there is none), checked
    against this run's `run_settings`. Returns this rank's state with rank 0's shared part (student,
    optimizer, scheduler, scaler) added, and the path of this rank's file.

    Each rank reads its own file and rank 0's, so the run folder must be on a file system all nodes
    see, as it is for the launch itself on a cluster. The ranks decide together: a damaged file on
    any rank moves all of them to the next older step.
    """
    ctx = context
    folder, rank = ctx.run_dir / STATE_DIR, ctx.global_rank
    steps = saved_steps(folder, rank)
    if ctx.multi_process:
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, steps)
        steps = sorted(set.intersection(*(set(s) for s in everyone)))
    if not steps:
        raise UserError(f"--resume: no state in {folder} that all {ctx.world_size} process(es) saved")
    for step in reversed(steps):
        result = _read_step(folder, step, rank, mmap=bool(settings.get("fsdp")))
        outcomes = [result if isinstance(result, str) else result is not None]
        if ctx.multi_process:
            outcomes = [None] * ctx.world_size
            dist.all_gather_object(outcomes, result if isinstance(result, str) else result is not None)
        refused = [o for o in outcomes if isinstance(o, str)]
        if refused:
            raise UserError(refused[0])
        if all(outcomes):
            own, shared = result
            break
        if ctx.is_master:
            logger.warning("--resume: the state of micro-batch %d is damaged on some rank; falling back", step)
    else:
        raise UserError(f"--resume: no intact state in {folder} (every saved state is damaged)")
    if step != steps[-1] and ctx.is_master:
        logger.warning(
            "--resume: resuming from micro-batch %d, the newest intact state (newest saved: %d)", step, steps[-1]
        )
    _check_run_settings(shared["run"], settings, folder / state_file_name(step, 0))
    return {**own, **{k: shared[k] for k in _SHARED_KEYS}}, folder / state_file_name(step, rank)


def _check_run_settings(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    if "corpus" in saved and saved["corpus"] != now["corpus"]:
        raise UserError(
            f"--resume: {path} was saved on another corpus (its fingerprint differs from "
            "--data_file's); resume on the corpus the run was trained on"
        )
    mismatch = [f"{k}={v} (this run: {now.get(k)})" for k, v in saved.items() if k != "corpus" and now.get(k) != v]
    if mismatch:
        raise UserError(f"--resume: {path} was saved with {', '.join(mismatch)}; resume with those")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a saved `optimizer.state_dict()`, its parameter groups matched to this optimizer's by their
    "name"; the weight decay and epsilon stay this run's (its flags hold from the resumed step on).

    The Adam moments and step counts are the saved ones; the learning rates are set by
    `load_schedule`. States written before the groups were named hold them in this optimizer's
    order, and are matched by position.
    """
    names = [group["name"] for group in optimizer.param_groups]
    groups = saved["param_groups"]
    if len(groups) == len(names) and not any("name" in g for g in groups):
        groups = [{**g, "name": name} for g, name in zip(groups, names, strict=True)]
    by_name = {g.get("name"): g for g in groups}
    if len(groups) != len(names) or set(by_name) != set(names):
        raise UserError(
            f"--resume: the saved optimizer has parameter groups {[g.get('name') for g in groups]}, "
            f"this run's has {names}: the state was not saved by this student's training"
        )
    for group in optimizer.param_groups:
        n_saved, n_now = len(by_name[group["name"]]["params"]), len(group["params"])
        if n_saved != n_now:
            raise UserError(
                f"--resume: the saved optimizer's parameter group {group['name']!r} holds {n_saved} "
                f"parameters, this run's {n_now}: the state was not saved by this student's training"
            )
    keep = {group["name"]: (group["weight_decay"], group["eps"]) for group in optimizer.param_groups}
    optimizer.load_state_dict({**saved, "param_groups": [by_name[name] for name in names]})
    for group in optimizer.param_groups:
        group["weight_decay"], group["eps"] = keep[group["name"]]


def load_schedule(scheduler: LambdaLR, saved: dict[str, Any], learning_rate: float) -> None:
    """Continue this run's schedule at the step of a saved `scheduler.state_dict()`.

    The schedule is this run's (built for its total of steps, with its warm-up and peak
    `learning_rate`), evaluated at the resumed step, so a longer run continues with the learning
    rate the new schedule gives there rather than the old one's final 0. Every parameter group of
    the scheduler's optimizer gets that learning rate.
    """
    step = saved["last_epoch"]
    lrs = [learning_rate * lr_lambda(step) for lr_lambda in scheduler.lr_lambdas]
    # The state dict holds every attribute of the scheduler: its base learning rates and the last
    # ones it set (what get_last_lr returns) become this schedule's, at the saved step.
    scheduler.load_state_dict({**saved, "base_lrs": [learning_rate] * len(lrs), "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["initial_lr"], group["lr"] = learning_rate, lr
