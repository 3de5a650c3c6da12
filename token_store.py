"""Binarized corpora on disk: the original pickle format and a memory-mapped store.

Two formats hold the same thing, a corpus of token-id sequences:

* ``*.pickle`` -- the original format: a pickled Python ``list`` of 1-D numpy arrays. It is
  read with a restricted unpickler that only rebuilds lists of integer numpy arrays, so a
  file can never execute code on load.
* ``*.tokens.npy`` + ``*.offsets.npy`` -- a flat array of all tokens and an ``int64``
  array of ``n + 1`` sequence boundaries. It is opened with ``np.memmap`` semantics, so
  N training processes share one page cache instead of N private copies.

Both load into a `TokenSequences`: ``flat`` + ``offsets``, indexable like a list.

Id width (both formats, as the original pipeline did): ``uint16`` when the vocabulary has fewer
than 65,536 ids, else ``int32`` (`token_dtype`); ``int32`` holds any vocabulary below 2**31, so a
128k Llama-3 vocabulary fits. Readers accept any integer dtype (files written by other tools) and
refuse the rest; a cast to a narrower dtype that would wrap an id is refused (`cast_ids`), never
done silently; ids are checked against the model's vocabulary before use (`check_vocab_range`).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from utils import UserError, atomic_path, cannot_write_in, nearest_existing

TOKENS_SUFFIX = ".tokens.npy"
OFFSETS_SUFFIX = ".offsets.npy"
PICKLE_SUFFIXES = (".pickle", ".pkl")


ID_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32))  # what this project writes, narrow to wide


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype of the ids of a vocabulary of `vocab_size`: uint16 below 65,536 ids, else int32.

    The boundary is the original's (``vocab_size < 1 << 16``), although 65,536 ids would fit in uint16.
    """
    if vocab_size < 1 << 16:
        return ID_DTYPES[0]
    if vocab_size <= 1 << 31:
        return ID_DTYPES[1]
    raise UserError(f"a vocabulary of {vocab_size} ids does not fit in {ID_DTYPES[-1]} token ids")


def common_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
    """One integer dtype holding every id of arrays of `dtypes` (int64 where numpy would pick a float:
    uint64 mixed with a signed type)."""
    dtypes = [np.dtype(d) for d in dtypes]
    if not dtypes:
        return ID_DTYPES[0]
    dtype = np.result_type(*dtypes)
    return dtype if np.issubdtype(dtype, np.integer) else np.dtype(np.int64)


def cast_ids(flat: np.ndarray, dtype: np.dtype, what: str = "token ids") -> np.ndarray:
    """`flat` as `dtype`, refusing (never wrapping) ids that `dtype` cannot hold."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise UserError(f"cannot store {what} as {dtype}: token ids need an integer dtype")
    if flat.dtype == dtype or np.can_cast(flat.dtype, dtype, "safe") or len(flat) == 0:
        return flat.astype(dtype, copy=False)
    lo, hi = int(flat.min()), int(flat.max())
    info = np.iinfo(dtype)
    if lo < info.min or hi > info.max:
        raise UserError(f"{what} span [{lo}, {hi}], which {dtype} cannot hold")
    return flat.astype(dtype)


class TokenSequences(Sequence[np.ndarray]):
    """A corpus as one flat token array plus boundaries; ``seqs[i]`` is a view, not a copy.

    flat: (n_tokens,) integer array (possibly a read-only memmap).
    offsets: (n_sequences + 1,) int64, ``offsets[0] == 0``, non-decreasing, ends at n_tokens.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_list(cls, seqs: Iterable[np.ndarray], dtype: np.dtype | None = None) -> TokenSequences:
        seqs = [np.asarray(s) for s in seqs]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if dtype is None:
            dtype = common_dtype(s.dtype for s in seqs)
        flat = np.concatenate([cast_ids(s, dtype) for s in seqs]) if seqs else np.zeros(0, dtype)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.flat[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """(n_sequences,) int64 sequence lengths."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def permuted(self, order: np.ndarray, block: int = 1 << 20) -> TokenSequences:
        """A new corpus whose sequence i is ``self[order[i]]`` (vectorised, in blocks of sequences)."""
        order = np.asarray(order, dtype=np.int64)
        lengths = self.lengths[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=self.flat.dtype)
        for b in range(0, len(order), block):
            o, n = order[b : b + block], lengths[b : b + block]
            # Position of every output token in the source: its sequence's source start + its rank in it.
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            flat[offsets[b] : offsets[b] + len(within)] = self.flat[np.repeat(self.offsets[o], n) + within]
        return TokenSequences(flat, offsets)

    def to_list(self) -> list[np.ndarray]:
        """Independent arrays, one per sequence (the original pickle's payload)."""
        return [np.array(s) for s in self]


# --- restricted unpickling -------------------------------------------------------------

# The only globals a pickled list of numpy arrays needs. Everything else is refused, so a
# crafted file cannot reach os.system, eval, subprocess, ... through its pickle opcodes.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 pickles rebuild arrays from a bytes buffer.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    # Protocol 2 pickles carry array bytes through codecs.encode (a data transform only).
    ("_codecs", "encode"),
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"forbidden global {module}.{name}")


def _check_integer_array(a: object, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        found = f"{a.ndim}-D {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise UserError(f"{what} is not a 1-D integer numpy array ({found})")
    return a


def safe_load_pickle(path: str | os.PathLike, what: str = "binarized data file") -> object:
    """Unpickle `path` allowing only numpy arrays/dtypes and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(io.BufferedReader(f)).load()
    except _ForbiddenGlobal as e:
        raise UserError(f"{what} {path} is not a safe pickle of integer arrays: {e}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        OverflowError,
        RecursionError,
    ) as e:  # what arbitrary bytes make the unpickler raise
        raise UserError(f"{what} {path} is empty, truncated or corrupt ({type(e).__name__}: {e})") from None


def load_pickle_sequences(path: str | os.PathLike) -> TokenSequences:
    obj = safe_load_pickle(path)
    if not isinstance(obj, list):
        raise UserError(f"binarized data file {path} holds a {type(obj).__name__}, expected a list of arrays")
    for i, a in enumerate(obj):
        _check_integer_array(a, f"entry {i} of {path}")
    return TokenSequences.from_list(obj, dtype=common_dtype({a.dtype for a in obj}))


# --- memory-mapped store -----------------------------------------------------------------


def offsets_path_for(tokens_path: str | os.PathLike) -> Path:
    tokens_path = Path(tokens_path)
    return tokens_path.with_name(tokens_path.name[: -len(TOKENS_SUFFIX)] + OFFSETS_SUFFIX)


def load_memmap_sequences(path: str | os.PathLike) -> TokenSequences:
    path = Path(path)
    offsets_path = offsets_path_for(path)
    for p in (path, offsets_path):
        if not p.is_file():
            raise UserError(f"memory-mapped store file not found: {p}")
    try:
        flat = np.load(path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"memory-mapped store {path} is corrupt: {e}") from None
    _check_integer_array(flat, f"token array {path}")
    _check_integer_array(offsets, f"offset array {offsets_path}")
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
        raise UserError(f"offsets {offsets_path} do not match token array {path} (truncated or mixed files?)")
    return TokenSequences(flat, offsets.astype(np.int64, copy=False))


def load_sequences(path: str | os.PathLike) -> TokenSequences:
    """Load a binarized corpus: ``*.pickle`` (restricted) or ``*.tokens.npy`` (memory-mapped)."""
    name = str(path)
    if name.endswith(TOKENS_SUFFIX):
        return load_memmap_sequences(path)
    if name.endswith(OFFSETS_SUFFIX):
        raise UserError(f"{path} is an offsets file; pass the matching {TOKENS_SUFFIX} file")
    if name.endswith(PICKLE_SUFFIXES):
        return load_pickle_sequences(path)
    raise UserError(f"unknown binarized data format for {path}: expected *.pickle or *{TOKENS_SUFFIX}")


# --- writing ---------------------------------------------------------------------------------


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output `path` that cannot be written: its folder (or the nearest
    existing folder above it, where the rest will be created) must take a new file. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file name")
    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise UserError(f"cannot write {flag} {path}: {folder} is not a folder")
    problem = cannot_write_in(folder)
    if problem is not None:
        raise UserError(f"cannot write {flag} {path}: {folder} is not writable ({problem})")


@contextmanager
def new_folders(folder: str | os.PathLike) -> Iterator[None]:
    """Create `folder` (and missing parents); if the body fails, remove again those it created (if empty)."""
    missing, f = [], Path(folder)
    while not f.exists() and f != f.parent:
        missing.append(f)
        f = f.parent
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for f in missing:  # deepest first
            try:
                f.rmdir()
            except OSError:
                break
        raise


@contextmanager
def output_file(path: str | os.PathLike) -> Iterator[Path]:
    """`utils.atomic_path` whose write errors (no space left, file too large, ...) become one UserError.

    On failure nothing is left at `path` but the previous file, if there was one (nor a folder made for it).
    """
    try:
        with new_folders(Path(path).parent), atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        # numpy reports a short write without an errno ("N requested and M written").
        cause = e.strerror or f"{e} (disk full or over a file size limit?)"
        raise UserError(f"cannot write {path}: {cause}; nothing was written") from None


def save_pickle(seqs: Sequence[np.ndarray], path: str | os.PathLike) -> None:
    """Write the original format (a pickled list of arrays), atomically."""
    payload = seqs.to_list() if isinstance(seqs, TokenSequences) else [np.asarray(s) for s in seqs]
    with output_file(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)  # readable by the original's Python 3.7


def save_memmap(seqs: Sequence[np.ndarray], path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
    """Write ``path`` (must end in .tokens.npy) and its .offsets.npy sibling, atomically.

    Both are written to temporary files first; only when both are complete are they renamed
    (offsets, then tokens), so a failed write (a full disk) keeps the previous pair intact, and
    a reader validates that the two agree.
    """
    if not str(path).endswith(TOKENS_SUFFIX):
        raise UserError(f"memory-mapped store path must end in {TOKENS_SUFFIX}: {path}")
    store = seqs if isinstance(seqs, TokenSequences) else TokenSequences.from_list(seqs, dtype=dtype)
    flat = store.flat if dtype is None else cast_ids(store.flat, dtype, f"the ids written to {path}")
    with output_file(path) as tokens_tmp, output_file(offsets_path_for(path)) as offsets_tmp:
        with open(offsets_tmp, "wb") as f:
            np.save(f, np.asarray(store.offsets, dtype=np.int64))
        with open(tokens_tmp, "wb") as f:
            np.save(f, np.asarray(flat))


def save_sequences(seqs: Sequence[np.ndarray], path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
    """Write in the format the file name says (``*.tokens.npy`` memory-mapped, else pickle)."""
    if str(path).endswith(TOKENS_SUFFIX):
        save_memmap(seqs, path, dtype=dtype)
    else:
        if dtype is not None:
            seqs = [cast_ids(np.asarray(s), dtype, f"the ids written to {path}") for s in seqs]
        save_pickle(seqs, path)


def check_vocab_range(store: TokenSequences, vocab_size: int, path: str | os.PathLike) -> None:
    """Refuse ids outside [0, vocab_size): they would index past the embedding table."""
    if store.n_tokens == 0:
        return
    hi, lo = int(store.flat.max()), int(store.flat.min())
    if lo < 0:
        raise UserError(f"{path} has negative token ids (down to {lo}): not ids of any vocabulary")
    if hi >= vocab_size:
        raise UserError(f"{path} has token ids in [{lo}, {hi}], outside the vocabulary of size {vocab_size}")
