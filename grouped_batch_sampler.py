"""Batches of sequences of similar length (less padding), on one process or many.

`GroupedBatchSampler` wraps any index sampler -- typically a `DistributedSampler`, so each
rank groups only its own shard -- and yields a batch as soon as `batch_size` indices of
one length bin have been seen. The indices left over at the end are emitted bin by bin,
so the number of batches per epoch is always ``ceil(len(sampler) / batch_size)``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler

# Length bins of width 4 whose edges are 3, 7, 11, ..., as in the original: lengths 3-6 share a
# bin, then 7-10, and so on (every sequence is at least CLS + SEP, so the first edge is 3).
BIN_START, BIN_WIDTH = 3, 4


def create_lengths_groups(lengths: Sequence[int] | np.ndarray, k: int = 0) -> np.ndarray:
    """(n,) bin id of each length: bins with edges 3, 7, 11, ... up to max(lengths) (k=0), or one bin."""
    lengths = np.asarray(lengths)
    if k != 0:
        return np.zeros(len(lengths), dtype=np.int64)
    bins = np.arange(BIN_START, lengths.max() + 1, BIN_WIDTH)
    return np.searchsorted(bins, lengths, side="right")


class GroupedBatchSampler(BatchSampler):
    """Yield lists of `batch_size` indices from `sampler` that share a group id.

    group_ids: (len(dataset),) group of each dataset index (see `create_lengths_groups`).
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int] | np.ndarray, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to a sampler that reshuffles per epoch (DistributedSampler)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        n_batches = 0
        for idx in self.sampler:
            group = int(self.group_ids[idx])
            buffers[group].append(int(idx))
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                n_batches += 1
        # Leftovers: fill batches from the bins in order so the count stays deterministic.
        leftover = [i for group in sorted(buffers) for i in buffers[group]]
        for start in range(0, len(leftover), self.batch_size):
            yield leftover[start : start + self.batch_size]
            n_batches += 1
        assert n_batches == len(self), (n_batches, len(self))

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size
