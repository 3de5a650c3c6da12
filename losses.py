"""Distillation losses as pure functions of already-selected rows.

Every function takes the rows a loss uses -- positions picked out of ``(bs, seq_len, ...)``
tensors with a boolean mask -- so the distiller can compute the LM head only there.
Shapes: ``N`` selected positions, ``V`` vocabulary size, ``D`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

    Same value and gradient as ``kl_div(log_softmax(s/T), log_softmax(t/T))`` under autograd. On CPU
    rows go through in chunks of about ``_CHUNK_ELEMENTS`` values: the (N, V) temporaries of a direct
    computation (several fresh 60 MB tensors per call at N = 512, V = 30522) cost more in page
    faults and memory traffic than the arithmetic; chunks stay in cache and reuse their memory.
    Nothing is saved but the inputs: the backward recomputes both softmaxes chunk by chunk.
    """

    @staticmethod
    def forward(ctx, s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        kl = s_logits.new_zeros((), dtype=torch.float32)
        for s, t in zip(*_row_chunks(s_logits, t_logits), strict=False):
            log_p_s = torch.log_softmax(s.float() / temperature, dim=-1)
            log_p_t = torch.log_softmax(t.float() / temperature, dim=-1)
            log_p_s.sub_(log_p_t).neg_()  # log p_t - log p_s
            kl += torch.dot(log_p_t.exp_().flatten(), log_p_s.flatten())
        ctx.save_for_backward(s_logits, t_logits)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s_logits, t_logits = ctx.saved_tensors
        temperature = ctx.temperature
        out = torch.empty_like(s_logits)
        scale = grad / temperature
        for s, t, o in zip(*_row_chunks(s_logits, t_logits, out), strict=False):
            p_s = torch.softmax(s.float() / temperature, dim=-1)
            p_s.sub_(torch.softmax(t.float() / temperature, dim=-1)).mul_(scale)
            o.copy_(p_s)
        return out, None, None


_CHUNK_ELEMENTS = 1 << 18  # values per chunk on CPU (1 MiB in float32, cache-sized: benchmarks/bench_kl.py)
_CHUNK_ELEMENTS_GPU = 1 << 28  # on GPU the caching allocator reuses memory: big kernels, few launches


def _row_chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The (N, V) tensors cut into the same row blocks of about _CHUNK_ELEMENTS values."""
    n, v = tensors[0].shape
    elements = _CHUNK_ELEMENTS if tensors[0].device.type == "cpu" else _CHUNK_ELEMENTS_GPU
    rows = max(1, elements // max(v, 1))
    return [t.split(rows) for t in tensors]


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


@dataclass
class LossInputs:
    """What the loss terms read: both models' runs, the LM rows and labels, the temperature."""

    s: Any  # the student's runs (diito_runs.ModelRuns: logits, hidden, cf_logits, cf_hidden)
    t: Any  # the teacher's
    lm_logits: torch.Tensor  # (N_lm, V) student logits of the rows with an LM label
    lm_labels: torch.Tensor  # (N_lm,)
    temperature: float


# Loss name -> term; the step sums alpha * term over the non-zero alphas.
LOSS_TERMS: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "ce": lambda x: ce_loss(x.s.logits, x.t.logits, x.temperature),
    "mlm": lambda x: mlm_loss(x.lm_logits, x.lm_labels),
    "clm": lambda x: mlm_loss(x.lm_logits, x.lm_labels),  # next-token labels: the same cross-entropy
    "mse": lambda x: mse_loss(x.s.logits, x.t.logits),
    "cos": lambda x: cos_loss(x.s.hidden, x.t.hidden),
    "causal_ce": lambda x: ce_loss(x.s.cf_logits, x.t.cf_logits, x.temperature),
    "causal_cos": lambda x: cos_loss(x.s.cf_hidden, x.t.cf_hidden),
}
