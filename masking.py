"""Choosing positions in a batch: MLM targets (and their sampling weights), and the interchange
positions of DIITO.

All functions are vectorised over the batch (no Python loop over rows) and draw their
randomness from the given ``torch.Generator`` so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from losses import IGNORE_INDEX
from token_store import safe_load_pickle
from utils import UserError


def real_token_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(bs, seq_len) bool: True on the first ``lengths[i]`` positions of row i."""
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


def load_token_counts(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """(vocab,) float64 occurrences of each id in the training corpus (`scripts/token_counts.py`)."""
    counts = safe_load_pickle(path, "token counts file")
    if not isinstance(counts, (list, np.ndarray)) or len(counts) != vocab_size:
        n = len(counts) if hasattr(counts, "__len__") else type(counts).__name__
        raise UserError(f"token counts {path} has {n} entries, the vocabulary {vocab_size}")
    return np.asarray(counts, dtype=np.float64)


def token_probabilities(counts: np.ndarray, smoothing: float, special_ids: Iterable[int]) -> torch.Tensor:
    """(vocab,) MLM target weights from (vocab,) counts: ``max(count, 1) ** -smoothing``, special ids 0.

    smoothing 0 weighs every token alike; larger values favour rare tokens (the inherited 0.7).
    """
    probs = np.maximum(np.asarray(counts, dtype=np.float64), 1) ** -smoothing
    probs[list(special_ids)] = 0.0
    return torch.tensor(probs, dtype=torch.float32)


@dataclass
class MlmMasker:
    """The inherited MLM corruption: smoothed-frequency target sampling, 80/10/10 replacement.

    token_probs: (vocab,) sampling weight of each id, ``max(count, 1) ** -mlm_smoothing`` with
    special tokens at 0. pred_probs: (3,) probabilities of [MASK] / keep / random.
    """

    token_probs: torch.Tensor
    pred_probs: torch.Tensor
    mask_prop: float
    mask_id: int
    vocab_size: int

    def __call__(
        self, token_ids: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids (bs, L), lengths (bs,) -> corrupted ids (bs, L), labels (bs, L) (-100 unless a target).

        ``ceil(mask_prop * n_real_tokens)`` targets are drawn without replacement over the
        flattened batch; padding and special tokens have weight 0 and are never drawn.
        """
        bs, seq_len = token_ids.shape
        real = real_token_mask(lengths, seq_len)
        weights = self.token_probs.to(token_ids.device)[token_ids.flatten()] * real.flatten()
        n_candidates = int((weights > 0).sum())
        n_tgt = min(math.ceil(self.mask_prop * int(lengths.sum())), n_candidates)
        pred_mask = torch.zeros(bs * seq_len, dtype=torch.bool, device=token_ids.device)
        if n_tgt > 0:
            tgt = torch.multinomial(weights / weights.sum(), n_tgt, replacement=False, generator=generator)
            pred_mask[tgt] = True
        pred_mask = pred_mask.view(bs, seq_len)

        real_ids = token_ids[pred_mask]
        how = torch.multinomial(self.pred_probs, len(real_ids), replacement=True, generator=generator)
        rand_ids = torch.randint(self.vocab_size, real_ids.shape, device=token_ids.device, generator=generator)
        new_ids = torch.where(how == 0, self.mask_id, torch.where(how == 1, real_ids, rand_ids))
        corrupted = token_ids.masked_scatter(pred_mask, new_ids)
        labels = torch.where(pred_mask, token_ids, IGNORE_INDEX)
        return corrupted, labels


def choose_k_per_row(
    candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(bs, L) bool: ``k[i]`` positions drawn uniformly without replacement among ``candidates[i]``.

    k must not exceed the number of candidates of its row.
    """
    scores = torch.rand(candidates.shape, device=candidates.device, generator=generator)
    scores = scores.masked_fill(~candidates, 2.0)  # non-candidates sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < k[:, None]


def interchange_counts(lengths: torch.Tensor, dual_lengths: torch.Tensor, prop: float, max_token: int) -> torch.Tensor:
    """(bs,) ``int(min(len, dual_len) * prop)``, capped by ``max_token`` unless it is -1."""
    count = (torch.minimum(lengths, dual_lengths).double() * prop).long()
    return count if max_token == -1 else count.clamp(max=max_token)


def sample_interchange_masks(
    lengths: torch.Tensor,
    dual_lengths: torch.Tensor,
    seq_len: int,
    dual_seq_len: int,
    prop: float,
    max_token: int = -1,
    consecutive: bool = False,
    masked_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that exchange activations: interchange_mask (bs, seq_len), dual mask (bs, dual_seq_len).

    Row i selects the same number of positions on both sides, all among real tokens; the k-th
    selected base position receives the k-th selected dual position.

    - consecutive: one span of ``count`` tokens, random start inside each sequence's length.
    - masked_tokens (bs, seq_len) bool: the base positions are these MLM targets (at most
      dual_len of them, drawn at random when more), the dual positions are random.
    - otherwise: ``count`` random real positions on each side.
    """
    base_real = real_token_mask(lengths, seq_len)
    dual_real = real_token_mask(dual_lengths, dual_seq_len)
    if masked_tokens is not None:
        masked_tokens = masked_tokens & base_real
        count = torch.minimum(masked_tokens.sum(1), dual_lengths)
        return (
            choose_k_per_row(masked_tokens, count, generator),
            choose_k_per_row(dual_real, count, generator),
        )
    count = interchange_counts(lengths, dual_lengths, prop, max_token)
    if not consecutive:
        return choose_k_per_row(base_real, count, generator), choose_k_per_row(dual_real, count, generator)

    def span(n_real: torch.Tensor, width: int) -> torch.Tensor:
        u = torch.rand(n_real.shape, device=n_real.device, generator=generator, dtype=torch.float64)
        start = (u * (n_real - count + 1)).long()
        pos = torch.arange(width, device=n_real.device)[None, :]
        return (pos >= start[:, None]) & (pos < (start + count)[:, None])

    return span(lengths, seq_len), span(dual_lengths, dual_seq_len)


def sample_source_rows(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(bs,) long: the row of the same batch that serves as row i's dual (``--fast_mode``).

    A uniformly random cyclic permutation: no row is its own source (unless the batch has one row).
    """
    order = torch.randperm(batch_size, generator=generator, device=generator.device if generator else "cpu")
    rows = torch.empty_like(order)
    rows[order] = order.roll(-1)
    return rows


def swap_tokens(
    token_ids: torch.Tensor,
    dual_token_ids: torch.Tensor,
    interchange_mask: torch.Tensor,
    dual_interchange_mask: torch.Tensor,
) -> torch.Tensor:
    """Data augmentation: the base's ids at its selected positions replaced by the dual's, in order.

    token_ids (bs, L), dual_token_ids (bs, L'), masks with equal counts per row -> (bs, L).
    Boolean indexing is row-major, so the k-th True of each row pairs with the k-th True.
    """
    out = token_ids.clone()
    out[interchange_mask] = dual_token_ids[dual_interchange_mask]
    return out
