"""The training corpus: filtered token sequences, each paired with a dual (source) sequence.

`LmSeqsDataset` never copies the corpus. It keeps an index of (start, length, add CLS,
add SEP) into the flat token array of a `token_store.TokenSequences`, so a memory-mapped
corpus stays on disk (shared page cache) and only the index, a few tens of bytes per
sequence, lives in each process.

Filtering is the original's, vectorised:
1. sequences longer than the model's max input are cut into chunks of ``max_len - 2``
   tokens and CLS/SEP (BOS/EOS for causal LMs) are restored on each chunk (which tokens frame a
   sequence is the family's row in ``architectures.ARCHITECTURES``; a tokenizer without a start
   token, like Qwen's, gets chunks of ``max_len - 1`` tokens ending with EOS);
2. sequences of 11 tokens or fewer are dropped;
3. sequences whose tokens are 50% or more unknown are dropped.

Every base sequence ``i`` is paired with the dual sequence ``dual_index[i]``, one seeded
permutation drawn when the dataset is built, so every distributed rank pairs identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from architectures import ARCHITECTURES
from token_store import TokenSequences
from utils import UserError

logger = logging.getLogger(__name__)

MIN_LENGTH = 12  # sequences of 11 tokens or fewer are dropped, as in the original
MAX_UNK_SHARE = 0.5
_UNK_COUNT_BLOCK = 1 << 22  # tokens scanned at once when counting unknowns (bounds temp memory)


@dataclass
class DatasetParams:
    """What the dataset needs to know about the model and tokenizer.

    special_token_ids: names as in the original (``cls_token``, ``sep_token``, ``pad_token``,
    ``unk_token``, ``mask_token`` for MLM; ``bos_token``, ``eos_token``, ``unk_token`` for CLM).
    family: the tokenizer's model family (a key of ``architectures.ARCHITECTURES``): its row says
    which tokens start and end a sequence. Without it, MLM sequences are framed by CLS/SEP and CLM
    ones by BOS/EOS. A tokenizer that defines no start token (Qwen's) frames with the end token only.
    """

    max_model_input_size: int
    mlm: bool
    special_token_ids: dict[str, int]
    seed: int = 56
    family: str | None = None

    def _framing(self) -> tuple[str | None, str]:
        if self.family is not None:
            row = ARCHITECTURES[self.family]
            return row.start_token, row.end_token
        return ("cls_token", "sep_token") if self.mlm else ("bos_token", "eos_token")

    @property
    def start_id(self) -> int | None:
        """Id every sequence starts with, or None where the tokenizer defines no start token."""
        name = self._framing()[0]
        return None if name is None else self.special_token_ids.get(name)

    @property
    def end_id(self) -> int:
        return self.special_token_ids[self._framing()[1]]

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.special_token_ids, self.mlm)


def pad_token_id(special_token_ids: dict[str, int], mlm: bool) -> int:
    """The id batches are padded with: the pad token for MLM.

    Causal batches are padded with the unknown id (`<|endoftext|>` for GPT-2), as in HF; a
    tokenizer without one pads with its pad, else its end token (causal runs never attend to it).
    """
    if mlm:
        return special_token_ids["pad_token"]
    for name in ("unk_token", "pad_token", "eos_token"):
        if name in special_token_ids:
            return special_token_ids[name]
    raise UserError("the tokenizer defines none of unk_token, pad_token, eos_token to pad batches with")


class LmSeqsDataset(Dataset):
    """Filtered sequences of a corpus; item ``i`` is ``(token_ids, length, dual_ids, dual_length)``."""

    def __init__(self, params: DatasetParams, data: TokenSequences | list[np.ndarray]):
        self.params = params
        self.store = data if isinstance(data, TokenSequences) else TokenSequences.from_list(data)
        if len(self.store) == 0:
            raise UserError("the corpus is empty")
        self._check_framing()
        n_raw, n_tok_raw = len(self.store), self.store.n_tokens
        self._build_chunks()
        keep = self.lengths >= MIN_LENGTH
        n_short = int((~keep).sum())
        self._select(keep)
        keep = self._unknown_share() < MAX_UNK_SHARE if "unk_token" in params.special_token_ids else None
        n_unk = 0 if keep is None else int((~keep).sum())
        if keep is not None:
            self._select(keep)
        if len(self) == 0:
            raise UserError(
                f"no sequence left after filtering {n_raw} sequences "
                f"({n_short} of {MIN_LENGTH - 1} tokens or fewer, {n_unk} mostly unknown tokens)"
            )
        self.dual_index = np.random.default_rng(params.seed).permutation(len(self))
        logger.info(
            "Dataset: %d sequences (%d tokens) -> %d after filtering (%d short, %d mostly unknown); %d tokens",
            n_raw,
            n_tok_raw,
            len(self),
            n_short,
            n_unk,
            int(self.lengths.sum()),
        )

    # --- building the index --------------------------------------------------------------

    def _check_framing(self) -> None:
        starts, lengths = self.store.offsets[:-1], self.store.lengths
        nonempty = lengths > 0
        start_id, end_id = self.params.start_id, self.params.end_id
        last = self.store.flat[starts[nonempty] + lengths[nonempty] - 1]
        wrong = last != end_id
        if start_id is not None:
            wrong |= self.store.flat[starts[nonempty]] != start_id
        bad = np.flatnonzero(wrong)
        if len(bad) or not nonempty.all():
            i = int(np.flatnonzero(nonempty)[bad[0]]) if len(bad) else int(np.flatnonzero(~nonempty)[0])
            framing = (
                f"end with id {end_id}" if start_id is None else f"start with id {start_id} and end with id {end_id}"
            )
            raise UserError(
                f"sequence {i} of the corpus does not {framing}: was it binarized with another tokenizer type?"
            )

    def _build_chunks(self) -> None:
        """Split sequences longer than the max input into chunks of max_len - 2 tokens (max_len - 1
        without a start token), restoring the framing tokens on each chunk."""
        max_len = self.params.max_model_input_size
        if max_len < 3:
            raise UserError(f"max model input size {max_len} is too small")
        start_id = self.params.start_id
        step = max_len - 2 if start_id is not None else max_len - 1
        seq_starts, seq_lens = self.store.offsets[:-1], self.store.lengths
        n_chunks = np.where(seq_lens > max_len, -(-seq_lens // step), 1)
        seq_of_chunk = np.repeat(np.arange(len(seq_lens)), n_chunks)
        chunk_no = np.arange(len(seq_of_chunk)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        long = seq_lens[seq_of_chunk] > max_len
        self.starts = seq_starts[seq_of_chunk] + chunk_no * step * long
        self.src_lengths = np.where(
            long, np.minimum(step, seq_lens[seq_of_chunk] - chunk_no * step), seq_lens[seq_of_chunk]
        )
        flat = self.store.flat
        self.add_start = long & (flat[self.starts] != start_id) if start_id is not None else np.zeros_like(long)
        self.add_end = long & (flat[self.starts + self.src_lengths - 1] != self.params.end_id)
        self.lengths = self.src_lengths + self.add_start + self.add_end

    def _select(self, keep: np.ndarray) -> None:
        for name in ("starts", "src_lengths", "add_start", "add_end", "lengths"):
            setattr(self, name, getattr(self, name)[keep])

    def _unknown_share(self) -> np.ndarray:
        """(n,) share of unknown tokens per sequence, scanning the corpus in bounded blocks."""
        unk = self.params.special_token_ids["unk_token"]
        counts = np.zeros(len(self.starts), dtype=np.int64)
        flat, i = self.store.flat, 0
        while i < len(self.starts):
            # Sequences [i, j) whose tokens span at most one block (at least one sequence).
            j = max(i + 1, int(np.searchsorted(self.starts, self.starts[i] + _UNK_COUNT_BLOCK, side="left")))
            lo, hi = int(self.starts[i]), int(self.starts[j - 1] + self.src_lengths[j - 1])
            is_unk = np.zeros(hi - lo + 1, dtype=np.int32)  # one spare 0 so every bound is a valid index
            np.equal(flat[lo:hi], unk, out=is_unk[:-1], casting="unsafe")
            # Dropped sequences leave gaps between kept ones: sum [start, end) pairs with reduceat
            # and keep every other sum (the ones between an end and the next start are the gaps).
            s = self.starts[i:j] - lo
            bounds = np.stack([s, s + self.src_lengths[i:j]], axis=1).ravel()
            counts[i:j] = np.add.reduceat(is_unk, bounds)[::2]
            i = j
        return counts / self.lengths

    # --- access --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.starts)

    def sequence(self, i: int) -> np.ndarray:
        """(length,) int64 token ids of filtered sequence `i`, with restored CLS/SEP."""
        s, n = int(self.starts[i]), int(self.src_lengths[i])
        body = np.asarray(self.store.flat[s : s + n], dtype=np.int64)
        if self.add_start[i] or self.add_end[i]:
            parts = (
                [[self.params.start_id]] * bool(self.add_start[i])
                + [body]
                + [[self.params.end_id]] * bool(self.add_end[i])
            )
            body = np.concatenate(parts).astype(np.int64)
        return body

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, np.ndarray, int]:
        j = int(self.dual_index[i])
        return self.sequence(i), int(self.lengths[i]), self.sequence(j), int(self.lengths[j])

    def length_ordered_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Every sequence once, shortest first (stable: little padding, and the same batches each
        time), each batch collated by `batch_sequences`. Held-out scoring reads the set this way."""
        order = np.argsort(self.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            yield self.batch_sequences([self[int(i)] for i in order[start : start + batch_size]])

    def batch_sequences(self, batch: list[tuple[np.ndarray, int, np.ndarray, int]]):
        """Collate items into padded tensors.

        Returns token_ids (bs, L), lengths (bs,), dual_token_ids (bs, L), dual_lengths (bs,),
        with L the longest base length: each dual is padded, or cut, to L and its length clipped.
        """
        token_ids, lengths, dual_ids, dual_lengths = zip(*batch, strict=False)
        lengths = np.asarray(lengths, dtype=np.int64)
        dual_lengths = np.asarray(dual_lengths, dtype=np.int64)
        max_len = int(lengths.max())
        return (
            torch.from_numpy(_pad(token_ids, lengths, max_len, self.params.pad_id)),
            torch.from_numpy(lengths),
            torch.from_numpy(_pad(dual_ids, dual_lengths, max_len, self.params.pad_id)),
            torch.from_numpy(np.minimum(dual_lengths, max_len)),
        )


def _pad(seqs: tuple[np.ndarray, ...], lengths: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """(bs, width) int64: each sequence's first `width` tokens, right-padded with `pad_id`."""
    flat = np.concatenate(seqs)
    # Position of every token inside its own sequence; keep only those that fit.
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    row = np.repeat(np.arange(len(seqs)), lengths)
    fits = pos < width
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    out[row[fits], pos[fits]] = flat[fits]
    return out
