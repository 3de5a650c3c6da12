"""The benchmark scripts run and print their tables (tiny shapes; the figures themselves are in the README)."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_kl  # noqa: E402
import bench_step  # noqa: E402

TINY = ["--teacher_layers", "4", "--teacher_hidden", "32", "--teacher_heads", "2", "--student_layers", "2",
        "--batch_size", "2", "--seq_len", "16", "--reps", "1"]


def test_step_benchmark_prints_every_variant_and_the_end_to_end_table(capsys):
    ratios = bench_step.main(TINY + ["--fast", "--train_steps", "3"])
    out = capsys.readouterr().out
    assert set(ratios) == {"plain", "diito", "fast", "original"} and ratios["plain"] == 1.0
    assert all(r > 0 for r in ratios.values())
    for name in ratios:
        assert f"| {name} |" in out
    assert "end to end: causal_train.main" in out and "collation + MLM masking" in out


def test_flop_count_orders_the_variants_as_their_passes_do():
    args = bench_step.parse_args(TINY)
    flops = {v: bench_step.step_flops(args, v) for v in ("plain", "fast", "diito", "original")}
    assert flops["plain"] < flops["fast"] < flops["diito"] < flops["original"]
    # The exact step adds the teacher's source blocks 0..k and its blocks above k: one teacher pass.
    teacher = [p for p in bench_step.step_passes(args, "diito") if p.teacher]
    assert sum(p.blocks for p in teacher) == 2 * args.teacher_layers


def test_kl_benchmark_prints_three_variants(capsys):
    bench_kl.main(["--rows", "8", "--vocab", "50", "--reps", "2"])
    out = capsys.readouterr().out
    for name in ("autograd", "closed form", "losses.ce_loss"):
        assert f"| {name} |" in out
