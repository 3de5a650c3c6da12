"""Distillation losses as pure functions of already-selected rows.

Every function takes the rows a loss uses -- positions picked out of ``(bs, seq_len, ...)``
tensors with a boolean mask -- so the distiller can compute the LM head only there.
Shapes: ``N`` selected positions, ``V`` vocabulary size, ``D`` hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def ce_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), summed over V, averaged over N, times T^2.

    s_logits, t_logits: (N, V). This is the inherited ``KLDivLoss(reduction="batchmean")``.
    """
    t = temperature
    log_p_s = F.log_softmax(s_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(t_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl / max(s_logits.size(0), 1) * t**2


def mlm_loss(s_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over rows whose label is not -100. s_logits (N, V), labels (N,)."""
    return F.cross_entropy(s_logits.float(), labels, ignore_index=IGNORE_INDEX)


def mse_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Summed squared error divided by the number of rows N. (N, V) each."""
    return F.mse_loss(s_logits.float(), t_logits.float(), reduction="sum") / max(s_logits.size(0), 1)


def cos_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(s, t) over rows (cosine-embedding loss with target 1). (N, D) each."""
    return (1.0 - F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1, eps=1e-8)).mean()


def top1_agreement(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Share of rows where the student's and the teacher's argmax agree. (N, V) each -> scalar."""
    if s_logits.size(0) == 0:
        return s_logits.new_zeros(())
    return (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
