"""Per-rank memory of the teacher, the student and its optimizer: DDP against --fsdp, at 1 and 2 ranks.

    python benchmarks/bench_fsdp_memory.py
    python benchmarks/bench_fsdp_memory.py --teacher_layers 16 --teacher_hidden 1024 --student_layers 8

Four set-ups run one after the other in the same invocation: DDP and FSDP (`sharding.shard`, as
`causal_train.py --fsdp` does it), each with 1 and 2 processes (gloo, CPU; DDP with 1 process is the
plain single-process run). Each process builds a Llama teacher and student (bench_step.py's models:
grouped-query attention, SwiGLU, tied embeddings), the distiller as causal_train builds it, and
takes one DIITO training step (exact mode, causal_ce on): forward, backward, AdamW step.

Under FSDP, as `causal_train.py --fsdp` does, only rank 0 builds the models with weights; the other
ranks build them empty (`model_loading.empty_model`) and `sharding.shard` fills their shards from rank 0.

Each rank then reports the bytes of the tensors it holds -- counted from the live tensors, each
storage once, a sharded parameter by its local shard: the teacher's parameters, the student's
parameters, its gradients (before they are zeroed) and the AdamW states. Activations and the
blocks FSDP gathers while they run (one block at a time) are transient and not counted. The peak
RSS is each whole process's (torch itself included), rank 0 and the largest of the others.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

import psutil
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_step  # noqa: E402

from architectures import ARCHITECTURES  # noqa: E402
from model_loading import empty_model  # noqa: E402

SETUPS = [("DDP", 1), ("FSDP", 1), ("DDP", 2), ("FSDP", 2)]
COLUMNS = ("teacher", "student", "grads", "adam", "total")
DEFAULTS = dict(
    teacher_layers=8, teacher_hidden=512, teacher_heads=8, kv_heads=4, intermediate=1376, vocab=8192, student_layers=4
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in DEFAULTS.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=64)
    return p.parse_args(argv)


def step_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_step.py's settings for these shapes (its Llama recipe, CPU)."""
    flags = [f"--{k}={getattr(args, k)}" for k in (*DEFAULTS, "batch_size", "seq_len")]
    layers = [f"--teacher_map_layer={args.teacher_layers // 2}", f"--student_map_layer={args.student_layers // 2}"]
    return bench_step.parse_args(["--family", "llama", "--device", "cpu", *flags, *layers])


def local_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors` (a DTensor: its local shard), each storage once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(rank: int, mode: str, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sargs = step_args(args)
        if mode == "FSDP" and rank > 0:  # as causal_train.py --fsdp: only rank 0 holds weights before sharding
            row = ARCHITECTURES["llama"]
            teacher = empty_model(row, bench_step.llama_config(sargs, sargs.teacher_layers)).eval()
            student = empty_model(row, bench_step.llama_config(sargs, sargs.student_layers)).train()
        else:
            teacher, student = bench_step.build_models(sargs)
        for p in teacher.parameters():
            p.requires_grad = False
        with tempfile.TemporaryDirectory() as dump:
            d = bench_step.make_distiller(
                sargs,
                teacher,
                student,
                causal=True,
                fast=False,
                dump=Path(dump),
                world_size=world,
                rank=rank,
                fsdp=mode == "FSDP",
            )
            loss, _ = d._loss_step(bench_step.synthetic_batch(sargs))
            loss.backward()
            params = list(d.student.parameters())
            sizes = {
                "teacher": local_bytes(d.teacher.parameters()),
                "student": local_bytes(params),
                "grads": local_bytes(p.grad for p in params),
            }
            d.optimizer.step()
            sizes["adam"] = local_bytes(v for s in d.optimizer.state.values() for v in s.values() if v.dim() > 0)
        sizes["total"] = sum(sizes.values())
        sizes["rss"] = psutil.Process().memory_info().rss
        sizes["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process's peak (KiB)
        Path(out, f"{mode}_{world}_{rank}.json").write_text(json.dumps(sizes))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace) -> dict[tuple[str, int], dict[str, int]]:
    """(mode, world size) -> the byte counts of its largest rank (shards differ by at most a row or so)."""
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for mode, world in SETUPS:
            mp.spawn(worker, args=(mode, world, free_port(), args, out), nprocs=world, join=True)
            ranks = [json.loads(Path(out, f"{mode}_{world}_{r}.json").read_text()) for r in range(world)]
            results[mode, world] = {
                **max(ranks, key=lambda sizes: sizes["total"]),
                "peak_rss_rank0": ranks[0]["peak_rss"],
                "peak_rss_others": max((r["peak_rss"] for r in ranks[1:]), default=None),
            }
    return results


def table(results: dict[tuple[str, int], dict[str, int]]) -> str:
    mb = 2**20
    base = results["DDP", 1]["total"]
    lines = [
        "| set-up | ranks | "
        + " | ".join(f"{c} (MiB)" for c in COLUMNS)
        + " | total × DDP 1 rank | peak RSS rank 0 (MiB) | peak RSS other ranks (MiB) |",
        "|---|---|" + "---|" * (len(COLUMNS) + 3),
    ]
    for (mode, world), sizes in results.items():
        cells = " | ".join(f"{sizes[c] / mb:.1f}" for c in COLUMNS)
        rank0 = f"{sizes['peak_rss_rank0'] / mb:.0f}"
        others = "–" if sizes["peak_rss_others"] is None else f"{sizes['peak_rss_others'] / mb:.0f}"
        lines.append(f"| {mode} | {world} | {cells} | {sizes['total'] / base:.2f}x | {rank0} | {others} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, int], dict[str, int]]:
    args = parse_args(argv)
    results = measure(args)
    print(
        f"llama teacher {args.teacher_layers}x{args.teacher_hidden} -> student {args.student_layers} layers, "
        f"vocab {args.vocab}, float32; per rank, the largest rank's figures (the busiest shard)\n"
    )
    print(table(results))
    return results


if __name__ == "__main__":
    main()
