"""Time and peak memory of a DIITO training step with and without `--gradient_checkpointing`.

    python benchmarks/bench_recompute.py                                   # bert 12x768 -> 6, batch 4x512
    python benchmarks/bench_recompute.py --family llama --batch_size 4 --seq_len 512

bench_step.py's models and recipe (exact DIITO, causal_ce on). Each setting runs in its own fresh
process, taking turns `--repeats` times: one warm-up step, then `--reps` timed steps (forward,
backward; no optimizer update). Peak memory is the process's peak RSS on CPU (models and torch
included: compare the difference), `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SETTINGS = {"activations stored": False, "--gradient_checkpointing": True}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="Rounds of one process per setting, taking turns.")
    p.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    args, step_argv = p.parse_known_args(argv)
    return args, step_argv


def child(recompute: bool, step_argv: list[str]) -> dict:
    """One process: build the models, time `reps` steps, report seconds per step and the peak."""
    import bench_step
    import torch
    from step_variants import distiller_step, sync

    args = bench_step.parse_args(["--seq_len", "512", *step_argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student = bench_step.build_models(args)
    batch = bench_step.synthetic_batch(args)
    with tempfile.TemporaryDirectory() as dump:
        d = bench_step.make_distiller(
            args, teacher, student, causal=True, fast=False, dump=Path(dump), gradient_checkpointing=recompute
        )
        distiller_step(d, batch)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.reps):
            sync(args.device)
            start = time.perf_counter()
            distiller_step(d, batch)
            sync(args.device)
            times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_bytes": peak, "shape": f"{args.batch_size}x{args.seq_len}"}


def measure(args: argparse.Namespace, step_argv: list[str]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, recompute in SETTINGS.items():
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(int(recompute)), *step_argv], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{name}: the step failed:\n{done.stderr[-2000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def table(results: dict[str, list[dict]]) -> str:
    base = results["activations stored"]
    lines = [
        "| setting | s/step | x stored | peak (MiB) | peak − stored's (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for i, run in enumerate(runs):
            ratio = run["seconds"] / base[i]["seconds"]
            extra = (run["peak_bytes"] - base[i]["peak_bytes"]) / 2**20
            label = name if len(runs) == 1 else f"{name} (round {i + 1})"
            peak = run["peak_bytes"] / 2**20
            lines.append(f"| {label} | {run['seconds']:.3f} | {ratio:.2f}x | {peak:.0f} | {extra:+.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args, step_argv = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child == "1", step_argv)))
        return {}
    results = measure(args, step_argv)
    shape = results["activations stored"][0]["shape"]
    print(f"exact DIITO step, batch {shape}, bench_step.py's models ({' '.join(step_argv) or 'bert defaults'})\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
