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

    s_logits, t_logits: (N, V); t_logits is a target (no gradient reaches it). This is the inherited
    ``KLDivLoss(reduction="batchmean")``.
    """
    kl = _SoftTargetKL.apply(s_logits, t_logits.detach(), temperature)
    return kl / max(s_logits.size(0), 1) * temperature**2


class _SoftTargetKL(torch.autograd.Function):
    """Summed KL(softmax(t/T) || softmax(s/T)) with its gradient in closed form, (p_s - p_t) / T.

    Same value and gradient as ``kl_div(log_softmax(s/T), log_softmax(t/T))`` under autograd, in
    about half the passes over the (N, V) tensors, the largest elementwise work of a step.
    """

    @staticmethod
    def forward(ctx, s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        log_p_s = torch.log_softmax(s_logits.float() / temperature, dim=-1)
        log_p_t = torch.log_softmax(t_logits.float() / temperature, dim=-1)
        p_t = log_p_t.exp()
        kl = torch.dot(p_t.flatten(), log_p_t.flatten()) - torch.dot(p_t.flatten(), log_p_s.flatten())
        ctx.save_for_backward(log_p_s.exp_().sub_(p_t))  # p_s - p_t, in log_p_s's memory
        ctx.temperature, ctx.dtype = temperature, s_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p_diff,) = ctx.saved_tensors
        return (p_diff * (grad / ctx.temperature)).to(ctx.dtype), None, None


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
