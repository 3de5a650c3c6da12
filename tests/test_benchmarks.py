"""The benchmark scripts run and print their tables (tiny shapes; the figures themselves are in the README)."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_kl  # noqa: E402
import bench_step  # noqa: E402
import step_variants  # noqa: E402

TINY = [
    "--teacher_layers",
    "4",
    "--teacher_hidden",
    "32",
    "--teacher_heads",
    "2",
    "--student_layers",
    "2",
    "--batch_size",
    "2",
    "--seq_len",
    "16",
    "--reps",
    "1",
]


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
    flops = {v: step_variants.step_flops(args, v) for v in ("plain", "fast", "diito", "original")}
    assert flops["plain"] < flops["fast"] < flops["diito"] < flops["original"]
    # The exact step adds the teacher's source blocks 0..k and its blocks above k: one teacher pass.
    teacher = [p for p in step_variants.step_passes(args, "diito") if p.teacher]
    assert sum(p.blocks for p in teacher) == 2 * args.teacher_layers


def test_kl_benchmark_prints_three_variants(capsys):
    bench_kl.main(["--rows", "8", "--vocab", "50", "--reps", "2"])
    out = capsys.readouterr().out
    for name in ("autograd", "closed form", "losses.ce_loss"):
        assert f"| {name} |" in out


# A tiny Llama teacher and student (grouped-query attention, SwiGLU, tied embeddings, CLM recipe).
TINY_DECODER = [
    "--family",
    "llama",
    "--teacher_layers",
    "4",
    "--teacher_hidden",
    "32",
    "--teacher_heads",
    "4",
    "--kv_heads",
    "2",
    "--intermediate",
    "48",
    "--vocab",
    "120",
    "--student_layers",
    "3",
    "--teacher_map_layer",
    "2",
    "--student_map_layer",
    "1",
    "--batch_size",
    "2",
    "--seq_len",
    "16",
]


def test_decoder_step_benchmark_prints_every_variant(capsys):
    ratios = bench_step.main(TINY_DECODER + ["--reps", "1", "--fast", "--student_recompute"])
    out = capsys.readouterr().out
    assert set(ratios) == {"plain", "diito", "fast", "original", "recompute"} and ratios["plain"] == 1.0
    assert "llama: teacher 4x32 (4 heads, 2 kv heads, MLP 48) -> student 3 layers" in out
    for name in ratios:
        assert f"| {name} |" in out


def test_decoder_block_flops_equal_a_hand_count_and_flop_counter_mode():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = bench_step.parse_args(TINY_DECODER + ["--eager_attention"])
    # By hand, per token: q 32x32, k and v 32x(2 kv heads x 8), o 32x32, gate/up/down 32x48, and
    # scores + weighted sum over 16 keys for 4 heads of 8 dims; 2 FLOPs per multiply-add.
    hand = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48) + 2 * 2 * 16 * 32
    assert step_variants.block_flops_per_token(args) == hand
    assert step_variants.head_flops_per_row(args) == 2 * 32 * 120
    teacher, _ = bench_step.build_models(args)
    x = torch.randn(args.batch_size, args.seq_len, args.teacher_hidden)
    positions = teacher.model.rotary_emb(x, torch.arange(args.seq_len)[None])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher.model.layers[0](x, attention_mask=None, position_embeddings=positions)
    assert counter.get_total_flops() == args.batch_size * args.seq_len * hand


def test_decoder_step_flops_equal_flop_counter_mode_for_every_variant(tmp_path):
    """The analytic floor of each variant's passes, forward and backward, is what the step runs."""
    from torch.utils.flop_counter import FlopCounterMode

    args = bench_step.parse_args(TINY_DECODER + ["--eager_attention"])
    teacher, student = bench_step.build_models(args)
    batch = bench_step.synthetic_batch(args)
    for variant in step_variants.VARIANTS:
        d = bench_step.make_distiller(
            args, teacher, student, causal=variant != "plain", fast=variant == "fast", dump=tmp_path
        )
        step = {
            "recompute": lambda d=d: step_variants.recompute_step(d, batch),
            "original": lambda d=d: step_variants.original_step(d, batch, args),
        }.get(variant, lambda d=d: step_variants.distiller_step(d, batch))
        with FlopCounterMode(display=False) as counter:
            step()
        assert counter.get_total_flops() == step_variants.step_flops(args, variant), variant


def test_fsdp_memory_benchmark_prints_ddp_and_fsdp_at_one_and_two_ranks(capsys):
    import bench_fsdp_memory

    tiny = ["--teacher_layers", "4", "--teacher_hidden", "32", "--teacher_heads", "4", "--kv_heads", "2"]
    tiny += ["--intermediate", "48", "--vocab", "120", "--student_layers", "2", "--seq_len", "16"]
    results = bench_fsdp_memory.main(tiny)
    out = capsys.readouterr().out
    assert set(results) == {("DDP", 1), ("FSDP", 1), ("DDP", 2), ("FSDP", 2)}
    for mode, world in results:
        assert f"| {mode} | {world} |" in out
    # Two ranks: DDP holds everything on each; FSDP about half of the student, its states and the teacher.
    ddp, fsdp = results["DDP", 2], results["FSDP", 2]
    for column in ("teacher", "student", "grads", "adam", "total"):
        assert ddp[column] == results["DDP", 1][column], column
    for column in ("teacher", "student", "adam"):
        assert fsdp[column] < 0.6 * ddp[column], column
    assert results["DDP", 1]["peak_rss_others"] is None and fsdp["peak_rss_others"] > 100 * 2**20  # torch alone


def test_heap_benchmark_runs_the_quickstart_teacher_stage_per_setting(capsys, monkeypatch):
    import bench_heap

    settings = {k: bench_heap.SETTINGS[k] for k in ("trim after each step (shipped)", "glibc default")}
    monkeypatch.setattr(bench_heap, "SETTINGS", settings)
    results = bench_heap.main(["--tiny", "--steps", "2"])
    assert set(results) == set(settings)
    assert all(r["seconds"] > 0 and r["peak_mb"] > 100 for r in results.values())  # torch alone is more
    out = capsys.readouterr().out
    assert "| glibc default |" in out and "| 1.00x |" in out


def test_recompute_benchmark_reports_both_settings_from_their_own_processes(capsys):
    import bench_recompute

    tiny = ["--teacher_layers", "4", "--teacher_hidden", "32", "--teacher_heads", "4", "--student_layers", "2"]
    results = bench_recompute.main([*tiny, "--vocab", "200", "--batch_size", "2", "--seq_len", "32", "--reps", "1"])
    assert set(results) == set(bench_recompute.SETTINGS)
    assert all(
        r[0]["seconds"] > 0 and r[0]["peak_bytes"] > 100 * 2**20 and r[0]["shape"] == "2x32" for r in results.values()
    )
    out = capsys.readouterr().out
    assert "| activations stored | " in out and "| --gradient_checkpointing | " in out
