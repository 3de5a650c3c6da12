"""Losses equal the inherited direct computations; MLM masking and interchange positions keep their invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import losses as L
from masking import MlmMasker, choose_k_per_row, real_token_mask, sample_interchange_masks, swap_tokens

torch.manual_seed(0)


def test_ce_loss_is_batchmean_kl_times_t_squared():
    s, t, T = torch.randn(7, 50), torch.randn(7, 50), 2.0
    expected = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2
    assert torch.allclose(L.ce_loss(s, t, T), expected, atol=1e-6)
    assert L.ce_loss(t, t, T).abs() < 1e-6


def test_mlm_loss_ignores_unlabelled_rows():
    s, labels = torch.randn(6, 20), torch.tensor([3, -100, 5, -100, -100, 19])
    keep = labels != -100
    assert torch.allclose(L.mlm_loss(s, labels), F.cross_entropy(s[keep], labels[keep]))


def test_mse_loss_is_sum_over_rows():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    assert torch.allclose(L.mse_loss(s, t), ((s - t) ** 2).sum() / 4)


def test_cos_loss_is_cosine_embedding_with_target_one():
    s, t = torch.randn(5, 16), torch.randn(5, 16)
    expected = nn.CosineEmbeddingLoss()(s, t, torch.ones(5))
    assert torch.allclose(L.cos_loss(s, t), expected, atol=1e-6)


def test_top1_agreement_counts_matching_argmax():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [3.0, 0.0], [5.0, 1.0]])
    assert L.top1_agreement(s, t).item() == pytest.approx(2 / 3)


def make_masker(vocab=40, special=(0, 1, 2, 3)):
    probs = torch.ones(vocab)
    probs[list(special)] = 0
    return MlmMasker(probs, torch.tensor([0.8, 0.1, 0.1]), mask_prop=0.15, mask_id=3, vocab_size=vocab)


def test_mlm_masking_targets_real_non_special_tokens_only():
    masker = make_masker()
    lengths = torch.tensor([20, 9, 14])
    ids = torch.randint(4, 40, (3, 20))
    ids[:, 0] = 1
    ids[torch.arange(3), lengths - 1] = 2
    ids[~real_token_mask(lengths, 20)] = 0
    corrupted, labels = masker(ids, lengths, torch.Generator().manual_seed(0))
    targets = labels != -100
    assert targets.sum() == math.ceil(0.15 * 43)
    assert not targets[~real_token_mask(lengths, 20)].any()
    assert not targets[:, 0].any() and not targets[torch.arange(3), lengths - 1].any()
    assert torch.equal(labels[targets], ids[targets])
    assert torch.equal(corrupted[~targets], ids[~targets])


def test_mlm_replacement_split_is_80_10_10():
    masker = make_masker(vocab=1000, special=(0, 1, 2, 3))
    masker.mask_prop = 0.5
    ids = torch.randint(4, 1000, (64, 128))
    corrupted, labels = masker(ids, torch.full((64,), 128), torch.Generator().manual_seed(1))
    t = labels != -100
    n = t.sum().item()
    masked = (corrupted[t] == 3).float().mean().item()
    kept = (corrupted[t] == ids[t]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / 1000)) < 0.02 and n == 64 * 64


def test_choose_k_per_row_draws_exactly_k_candidates():
    cand = torch.rand(50, 30) < 0.5
    k = (cand.sum(1) * torch.rand(50)).long()
    sel = choose_k_per_row(cand, k, torch.Generator().manual_seed(2))
    assert torch.equal(sel.sum(1), k) and not (sel & ~cand).any()


@pytest.mark.parametrize("mode", ["random", "consecutive", "masked"])
def test_interchange_positions_are_real_tokens_with_equal_counts(mode):
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([30, 12, 25, 18, 30])
    dual_lengths = torch.tensor([14, 30, 25, 30, 3])
    masked = (torch.rand(5, 30, generator=g) < 0.3) & real_token_mask(lengths, 30)
    imask, dmask = sample_interchange_masks(
        lengths,
        dual_lengths,
        30,
        30,
        prop=0.3,
        consecutive=mode == "consecutive",
        masked_tokens=masked if mode == "masked" else None,
        generator=g,
    )
    assert torch.equal(imask.sum(1), dmask.sum(1))
    assert not (imask & ~real_token_mask(lengths, 30)).any()
    assert not (dmask & ~real_token_mask(dual_lengths, 30)).any()
    if mode == "masked":
        assert not (imask & ~masked).any()
        assert torch.equal(imask.sum(1), torch.minimum(masked.sum(1), dual_lengths))
    else:
        expected = (torch.minimum(lengths, dual_lengths) * 0.3).long()
        assert torch.equal(imask.sum(1), expected)
    if mode == "consecutive":
        for m in (imask, dmask):
            for row in m:
                pos = row.nonzero().flatten()
                assert len(pos) == 0 or (pos[-1] - pos[0] + 1) == len(pos)


def test_interchange_max_token_caps_the_count():
    imask, _ = sample_interchange_masks(torch.tensor([100]), torch.tensor([100]), 100, 100, prop=0.5, max_token=7)
    assert imask.sum() == 7


def test_swap_tokens_pairs_the_kth_positions_in_order():
    ids = torch.arange(10).repeat(2, 1)
    dual = torch.arange(100, 110).repeat(2, 1)
    imask = torch.zeros(2, 10, dtype=torch.bool)
    dmask = torch.zeros(2, 10, dtype=torch.bool)
    imask[0, [1, 5]] = True
    dmask[0, [7, 2]] = True
    imask[1, 9] = True
    dmask[1, 0] = True
    out = swap_tokens(ids, dual, imask, dmask)
    assert out[0].tolist() == [0, 102, 2, 3, 4, 107, 6, 7, 8, 9]
    assert out[1].tolist() == list(range(9)) + [100]
