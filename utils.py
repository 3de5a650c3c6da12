"""Shared helpers: the project's user-facing error and CLI wrapper, atomic writes, file and folder checks, seeding."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A mistake in the user's input (file, flag, value). The CLI prints it on one line and exits 2."""


class AbortRun(UserError):
    """A UserError after which the process ends at once, without the interpreter's clean-up.

    A run that lost a rank would otherwise wait at exit for the collectives still queued on the
    broken connection (gloo runs them one after another, each until --ddp_timeout).
    """


def first_line(e: BaseException) -> str:
    """An exception's first message line, or its type's name when it has no message."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' validation errors span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's `main()`, turning a `UserError` into one `error: ...` line and exit status 2."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, AbortRun):
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, else removed.

    Readers never see a partially written file, and an existing `path` survives a failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    follow_umask(tmp)  # mkstemp creates 0600 files
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder inside `folder`; on success the files written into it are moved into
    `folder` (replacing those of the same name), else it is removed.

    For a save of several files (a tokenizer): one cut short (disk full) leaves `folder` as it was.
    """
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=".saving.", dir=folder))
    try:
        yield staging
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def trim_heap() -> None:
    """Hand the free pages of glibc's heap back to the system (a no-op elsewhere).

    Training on CPU frees tensors of a few MB that glibc keeps in its heap, where they are poorly
    reused: a loop calling this after each optimizer step keeps its resident memory near what it uses
    (the MiniLM teacher stage of the quickstart: 4.2-4.4 GB without, 3.1 GB with, about 8 % slower;
    benchmarks/bench_heap.py).
    """
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


@contextmanager
def replacing_folder(dst: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a new folder beside `dst` to write into; on success it becomes `dst`, else it is removed.

    For a model folder: `dst` is always either the old folder or the whole new one, never a mix, and
    the new one has the modes a plain mkdir/open would have given it (mkdtemp makes 0700, safetensors
    0600). An old `dst` is moved aside first and removed last (put back if the move fails); with
    `replace=False` it must be empty (checked by the caller before its work): it is removed with
    rmdir, which fails, deleting nothing, if something appeared in it meanwhile.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    old = None
    try:
        yield tmp
        umask = _umask()
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if dst.exists() and not replace:
            dst.rmdir()
        elif dst.exists():
            old = dst.with_name(f"{tmp.name}.old")
            dst.rename(old)
        try:
            tmp.rename(dst)
        except OSError:
            if old is not None:
                old.rename(dst)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain open() would have given it (0666 less the umask)."""
    os.chmod(path, 0o666 & ~_umask())


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` if it exists, else its nearest existing parent (where creating it would start)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cannot_write_in(folder: str | os.PathLike) -> str | None:
    """Why a new file cannot be created in `folder`, or None if it can. Leaves nothing behind.

    Output checks call it before any work, so a run never fails at its last write.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def write_json(obj: object, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=4, sort_keys=True, default=str) + "\n")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def symlink_loop(path: str | os.PathLike) -> Path | None:
    """The first of `path` and its parents (from the top) that is a loop of symbolic links, or None."""
    path = Path(path).expanduser().absolute()
    for part in reversed([path, *path.parents]):
        try:
            os.stat(part)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return part
            return None  # nothing below a missing folder exists
    return None


def require_no_symlink_loop(path: str | os.PathLike, what: str) -> None:
    """Raise a `UserError` if `path` goes through a loop of symbolic links (it would read as missing)."""
    loop = symlink_loop(path)
    if loop is not None:
        raise UserError(f"{what} {path} cannot be reached: {loop} is a loop of symbolic links")


# Seeds every generator takes: numpy's (and the Trainer's) must lie in [0, 2**32).
SEED_RANGE = (0, 2**32 - 1)


def check_seed(value: int | None, flag: str) -> None:
    """Raise a `UserError` for a seed numpy cannot take (None: not given)."""
    low, high = SEED_RANGE
    if value is not None and not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high}, got {value}")


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path, or raise a UserError naming `what` if it is not an existing file
    (or cannot be reached: a loop of symbolic links)."""
    require_no_symlink_loop(path, what)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    return p
