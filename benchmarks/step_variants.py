"""The steps `bench_step.py` times, besides the distiller's own, and what each costs in matmul FLOPs.

- `distiller_step`: `CausalDistiller._loss_step` and backward (plain, diito and fast variants);
- `recompute_step`: the exact step with a dropout-free student's counterfactual run recomputing
  every block, as a student with dropout must;
- `original_step`: the original's pass structure (three full passes per model, full logits);
- `step_passes` / `step_flops`: the passes each variant runs and their FLOPs, counted analytically
  (`tests/test_benchmarks.py` checks them against torch's FlopCounterMode); `matmul_peak`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import losses  # noqa: E402
from architectures import hidden_size, num_heads  # noqa: E402
from causal_distiller import CausalDistiller  # noqa: E402
from interventions import interchange_with_activation_at  # noqa: E402
from masking import real_token_mask, sample_interchange_masks  # noqa: E402
from neuron_mapping import parse_variable_name, sample_interchange_variables  # noqa: E402


def distiller_step(distiller: CausalDistiller, batch: tuple[torch.Tensor, ...]) -> None:
    loss, _ = distiller._loss_step(batch)
    loss.backward()
    distiller.student.zero_grad(set_to_none=True)


def recompute_step(distiller: CausalDistiller, batch: tuple[torch.Tensor, ...]) -> None:
    """The exact step with the student's counterfactual run recomputing every block, as it does for a
    student with dropout (same numbers for this dropout-free student, more work)."""
    runs = distiller.student_runs
    assert not runs.has_dropout, "the llama student has no dropout: its exact step restarts"
    runs.has_dropout = True
    try:
        distiller_step(distiller, batch)
    finally:
        runs.has_dropout = False


# --- the original's pass structure -------------------------------------------------------------


def original_step(d: CausalDistiller, batch: tuple[torch.Tensor, ...], args: argparse.Namespace) -> None:
    """Three full passes per model with full-vocabulary logits on every position, as the original ran.

    Masking and positions come from the distiller's own helpers; the losses are the same functions,
    fed the way the original fed them (full (bs, L, V) logits, masked afterwards).
    """
    token_ids, lengths, dual_ids, dual_lengths = (t.to(d.device) for t in batch)
    n = token_ids.size(1)
    attn = real_token_mask(lengths, n)
    input_ids, labels = d._prepare(token_ids, lengths)
    dual_input_ids, _ = d._prepare(dual_ids, dual_lengths)
    t_vars, s_vars = sample_interchange_variables(d.mapping, d.mapping_rng)
    imask, dmask = sample_interchange_masks(
        lengths, dual_lengths, n, dual_ids.size(1), prop=0.3, consecutive=True, generator=d.generator
    )
    mask, dual_mask = attn.long(), real_token_mask(dual_lengths, dual_ids.size(1)).long()
    if not d.mlm:  # CLM: full-length rows, no mask (as the distiller runs decoders); next-token labels
        mask = dual_mask = None
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), losses.IGNORE_INDEX)], 1)

    def three_passes(model, names):
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        source = model(input_ids=dual_input_ids, attention_mask=dual_mask, output_hidden_states=True)
        values = [source.hidden_states[layer + 1][..., a:b] for layer, a, b in _sites(model, names)]
        cf_out = interchange_with_activation_at(model, input_ids, mask, values, names, imask, dmask)
        return out, cf_out

    with d._autocast():
        with torch.no_grad():
            t_out, t_cf = three_passes(d.teacher, t_vars)
        s_out, s_cf = three_passes(d.student, s_vars)
        vocab = s_out.logits.size(-1)
        full = attn[..., None].expand_as(s_out.logits)
        terms = [
            losses.ce_loss(
                s_out.logits.masked_select(full).view(-1, vocab),
                t_out.logits.masked_select(full).view(-1, vocab),
                d.temperature,
            ),
            losses.mlm_loss(s_out.logits.view(-1, vocab), labels.view(-1)),  # mlm, or clm on next tokens
            losses.cos_loss(s_out.hidden_states[-1][attn], t_out.hidden_states[-1][attn]),
            losses.ce_loss(
                s_cf.logits.masked_select(full).view(-1, vocab),
                t_cf.logits.masked_select(full).view(-1, vocab),
                d.temperature,
            ),
        ]
    (0.25 * sum(terms)).backward()
    d.student.zero_grad(set_to_none=True)


def _sites(model, names):
    d = hidden_size(model) // num_heads(model)
    return [(layer, head * d + loc.start, head * d + loc.stop) for layer, head, loc in map(parse_variable_name, names)]


# --- FLOPs and the matmul peak ------------------------------------------------------------------


@dataclass
class Pass:
    """One pass of one model: blocks and head rows run forward, and the part that runs backward."""

    teacher: bool
    blocks: int
    head_rows: int
    backward_blocks: int = 0
    backward_head_rows: int = 0


VARIANTS = ("plain", "diito", "fast", "original", "recompute")


def step_passes(args: argparse.Namespace, variant: str) -> list[Pass]:
    """The passes `variant` runs (forward, and the blocks / head rows its backward reaches)."""
    lt, ls, kt, ks = args.teacher_layers, args.student_layers, args.teacher_map_layer, args.student_map_layer
    tokens = args.batch_size * args.seq_len  # every token is real here
    sel = tokens  # ce on every real token
    plain = [Pass(True, lt, sel), Pass(False, ls, sel, ls, sel)]
    if variant == "plain":
        return plain
    # Sources stop after the mapped block; the teacher's counterfactual run restarts above it. The
    # student's restarts too unless it has dropout (the bert student; the llama student has none).
    restarted = Pass(False, ls - ks - 1, sel, ls - ks - 1, sel)
    recomputed = Pass(False, ls, sel, ls, sel)
    if variant in ("diito", "recompute"):
        student_cf = recomputed if variant == "recompute" or args.family == "bert" else restarted
        sources = [Pass(True, kt + 1, 0), Pass(False, ks + 1, 0, ks + 1, 0)]
        return plain + sources + [Pass(True, lt - kt - 1, sel), student_cf]
    if variant == "fast":
        return plain + [Pass(True, lt - kt - 1, sel), Pass(False, ls - ks - 1, sel, ls - ks - 1, sel)]
    assert variant == "original", variant
    # original: full passes with full logits; gradients reach the source run only below its site.
    return (
        [Pass(True, lt, tokens)] * 3 + [Pass(False, ls, tokens, ls, tokens)] * 2 + [Pass(False, ls, tokens, ks + 1, 0)]
    )


def block_flops_per_token(args: argparse.Namespace) -> float:
    """Forward matmul FLOPs of one block per token (2 per multiply-add), attention over all `seq_len` keys.

    bert: q, k, v, o (h x h each), the MLP (h x intermediate, twice), scores and weighted sum.
    llama: q (h x heads*head_dim), k and v (h x kv_heads*head_dim: grouped-query attention), o
    (heads*head_dim x h), the SwiGLU MLP (gate, up, down: three h x intermediate), scores and
    weighted sum per query head. RMSNorm, rotary, softmax and activations are not matmuls. Causal
    attention is counted over every key, as FlopCounterMode counts it (a causal kernel may skip the
    masked half: at 128 tokens and 576 hidden that is 2 % of a block).
    """
    h, n, i = args.teacher_hidden, args.seq_len, args.intermediate
    if args.family == "llama":
        q, kv = args.teacher_heads * args.head_dim, args.kv_heads * args.head_dim
        return 2 * (h * q + 2 * h * kv + q * h + 3 * h * i) + 2 * 2 * n * q
    return 2 * (4 * h * h + 2 * h * i) + 2 * 2 * n * h


def head_flops_per_row(args: argparse.Namespace) -> float:
    """Forward matmul FLOPs of the LM head per row: bert's transform (h x h) + the vocabulary projection."""
    h, v = args.teacher_hidden, args.vocab
    return 2 * h * v + (0 if args.family == "llama" else 2 * h * h)


def step_flops(args: argparse.Namespace, variant: str) -> float:
    """Matmul FLOPs of one step: 2 per multiply-add forward, twice that backward (input + weight grads)."""
    tokens = args.batch_size * args.seq_len
    block = tokens * block_flops_per_token(args)
    head = head_flops_per_row(args)
    total = 0.0
    for p in step_passes(args, variant):
        total += p.blocks * block + p.head_rows * head + 2 * (p.backward_blocks * block + p.backward_head_rows * head)
    return total


def matmul_peak(device: str) -> float:
    """Best FLOP/s of a large square matmul in the step's precision (fp32 CPU, bf16 CUDA)."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
