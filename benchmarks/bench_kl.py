"""Time the soft-target KL (the `ce` / `causal_ce` term) forward + backward, three ways, in one process.

    python benchmarks/bench_kl.py                     # N = 512 rows, V = 30522 (bert-base-uncased)
    python benchmarks/bench_kl.py --rows 1024 --vocab 50265

- autograd: `kl_div(log_softmax(s/T), log_softmax(t/T))` differentiated by autograd (the straightforward form);
- closed form: one pass forward, the gradient (p_s - p_t) / T saved for backward, on whole (N, V) tensors;
- losses.ce_loss: the closed form computed in row chunks (what training uses).

Each variant runs on fresh input tensors every repetition, as in training, where the logits are new
every step; the variants are interleaved. Prints the median milliseconds and the ratio to autograd.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import losses as L  # noqa: E402


def autograd_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / s.size(0) * temperature**2


class _WholeTensorKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, temperature):
        log_p_s = torch.log_softmax(s / temperature, dim=-1)
        log_p_t = torch.log_softmax(t / temperature, dim=-1)
        p_t = log_p_t.exp()
        kl = torch.dot(p_t.flatten(), log_p_t.flatten()) - torch.dot(p_t.flatten(), log_p_s.flatten())
        ctx.save_for_backward(log_p_s.exp_().sub_(p_t))
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad):
        (p_diff,) = ctx.saved_tensors
        return p_diff * (grad / ctx.temperature), None, None


def closed_form_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return _WholeTensorKL.apply(s, t, temperature) / s.size(0) * temperature**2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    variants = {"autograd": autograd_kl, "closed form": closed_form_kl, "losses.ce_loss": L.ce_loss}
    times: dict[str, list[float]] = {name: [] for name in variants}
    g = torch.Generator().manual_seed(0)
    for rep in range(args.reps + 1):
        for name, fn in variants.items():
            s = torch.randn(args.rows, args.vocab, generator=g).requires_grad_()
            t = torch.randn(args.rows, args.vocab, generator=g)
            start = time.perf_counter()
            loss = fn(s, t, args.temperature)
            loss.backward()
            if rep > 0:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["autograd"])
    print(
        f"soft-target KL forward + backward, {args.rows} x {args.vocab}, {torch.get_num_threads()} threads, "
        f"median of {args.reps}"
    )
    print("| variant | ms | x autograd |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
