"""Run the checks that need a CUDA GPU, one subprocess each, and print one Markdown table.

    python benchmarks/gpu_check.py --out runs/gpu_check          # about 6-8 minutes on one H100 / H200
    python benchmarks/gpu_check.py --quick                       # about 3 minutes
    python benchmarks/gpu_check.py --dry_run                     # print the plan (the commands), run nothing
    python benchmarks/gpu_check.py --device cpu --quick          # everything that does not need CUDA, tiny sizes

Checks, in order (each in its own subprocess with a timeout; a failure does not stop the others):

- cuda_tests: `pytest tests/test_cuda.py` (bf16 / fp16 steps of the distiller, CUDA = CPU for the
  interventions and losses in fp32, NCCL under torchrun);
- train_fp32, train_fp16, train_bf16: `causal_train.main` on one device for a few optimizer steps
  (fp32; `--fp16 --teacher_fp16` with a GradScaler; `--bf16`), DIITO recipe; the loss must stay
  finite and the student's weights must change;
- torchrun: the same training launched by `torchrun --standalone --nproc_per_node 1`, then an
  all-reduce and a DDP step over the launcher's process group (NCCL on CUDA, gloo on CPU);
- bench_step: `benchmarks/bench_step.py` at one or two shapes (tokens/s, MFU, x plain).

Models are random and built here (BERT teacher, DistilBERT student, a 30522-word vocabulary with
bert-base-uncased's special-token ids), so nothing is downloaded. The corpus is the real binarized
sample in ../shared/data when it is there (`--data auto`), else synthetic full-length rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_check_report import RESULT_TAG, Result, environment, format_table, nccl_version, result_of  # noqa: E402
from gpu_check_workspace import Sizes, Workspace, build_workspace, sizes_for, train_argv  # noqa: E402

from utils import UserError, run_cli  # noqa: E402

logger = logging.getLogger("gpu_check")


@dataclass
class Check:
    name: str
    verifies: str
    command: list[str]  # what runs (a subprocess)
    shows: str = ""  # the command a user would type for the same thing
    spec: dict = field(default_factory=dict)  # written to spec_path, which the child reads
    spec_path: Path | None = None
    skip: str = ""  # reason, when the check cannot run here


def plan(args: argparse.Namespace, sizes: Sizes, ws: Workspace, spec_dir: Path) -> list[Check]:
    me = [sys.executable, str(Path(__file__).resolve())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    checks = [
        Check(
            "cuda_tests",
            "the tests that need CUDA (tests/test_cuda.py)",
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_cuda.py")],
            skip="" if args.device == "cuda" else "needs CUDA",
        )
    ]
    # --teacher_fp16 keeps the teacher in the autocast dtype (float16 under --fp16), on CPU too.
    precisions = {"fp32": [], "fp16": ["--fp16", "--teacher_fp16"], "bf16": ["--bf16"]}
    for name, flags in precisions.items():
        argv = train_argv(ws, sizes, args.device, f"train_{name}", *flags)
        checks.append(
            Check(
                f"train_{name}",
                f"{sizes.train_steps} optimizer steps of causal_train on one {args.device} device"
                + (f" ({' '.join(flags)})" if flags else " (float32)")
                + ": finite losses, weights change",
                me + ["--child", "train", "--spec", str(spec_dir / f"train_{name}.json")],
                shows="python causal_train.py " + shlex.join(argv),
                spec=dict(argv=argv, device=args.device, initial_weights=str(ws.student_weights)),
                spec_path=spec_dir / f"train_{name}.json",
            )
        )
    backend = "nccl" if args.device == "cuda" else "gloo"
    argv = train_argv(ws, sizes, args.device, "torchrun", *(["--bf16"] if args.device == "cuda" else []))
    checks.append(
        Check(
            "torchrun",
            f"causal_train under torchrun (1 process), then all_reduce + a DDP step over {backend}",
            torchrun + me[1:] + ["--child", "train", "--spec", str(spec_dir / "torchrun.json")],
            shows="torchrun --standalone --nproc_per_node 1 causal_train.py " + shlex.join(argv),
            spec=dict(
                argv=argv, device=args.device, initial_weights=str(ws.student_weights), process_group_smoke=backend
            ),
            spec_path=spec_dir / "torchrun.json",
        )
    )
    for batch, seq_len in sizes.bench_shapes:
        argv = [
            "--teacher_layers",
            str(sizes.teacher_layers),
            "--teacher_hidden",
            str(sizes.teacher_hidden),
            "--teacher_heads",
            str(sizes.teacher_heads),
            "--student_layers",
            str(sizes.student_layers),
            "--batch_size",
            str(batch),
            "--seq_len",
            str(seq_len),
            "--reps",
            str(sizes.bench_reps),
            "--fast",
            "--device",
            args.device,
        ]
        name = f"bench_step_{batch}x{seq_len}"
        checks.append(
            Check(
                name,
                f"bench_step.py at batch {batch}x{seq_len}: tokens/s and MFU per step variant",
                me + ["--child", "bench", "--spec", str(spec_dir / f"{name}.json")],
                shows="python benchmarks/bench_step.py " + shlex.join(argv),
                spec=dict(argv=argv, device=args.device),
                spec_path=spec_dir / f"{name}.json",
            )
        )
    return checks


# --- running a check -----------------------------------------------------------------------------


def run_check(check: Check, timeout_s: int, log) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, stdout + stderr, seconds). Kills the whole process group on timeout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        check.command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    seconds = time.perf_counter() - start
    log.write(f"===== {check.name}: {shlex.join(check.command)}\n{out}\n===== exit {rc}, {seconds:.1f} s\n\n")
    log.flush()
    return rc, out, seconds


# --- children: what runs inside each check's subprocess -------------------------------------------


def _peak_start() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # else nothing was allocated yet
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    """CUDA: the caching allocator's peak of allocated bytes; CPU: this process's peak RSS."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_train(spec: dict) -> dict:
    """causal_train.main(argv) in this process; then its losses, throughput, peak memory, weight change."""
    import torch
    import torch.distributed as dist

    import causal_train

    backends: list[str] = []
    init = dist.init_process_group

    def recording_init(*a, **kw):
        backends.append(str(kw.get("backend", a[0] if a else "default")))
        return init(*a, **kw)

    dist.init_process_group = recording_init
    device = spec["device"]
    _peak_start()
    run = causal_train.main(spec["argv"])
    dist.init_process_group = init
    out: dict[str, Any] = dict(peak_gib=_peak_gib(device), problems=[], notes=[])
    losses = _scalars(run, "losses/loss")
    speeds = _scalars(run, "global/tokens_per_s")
    out["losses"] = losses
    if not losses:
        out["problems"].append("no losses/loss in TensorBoard")
    elif not all(math.isfinite(v) for v in losses):
        out["problems"].append(f"non-finite loss: {losses}")
    if len(speeds) > 1:
        speeds = sorted(speeds[1:])  # the first interval holds the warm-up
        out["tokens_per_s"] = speeds[len(speeds) // 2]
    final = torch.load(run / "pytorch_model.bin", map_location="cpu", weights_only=True)
    initial = torch.load(spec["initial_weights"], map_location="cpu", weights_only=True)
    if not all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point()):
        out["problems"].append("non-finite weights")
    changed = max((final[k].float() - v.float()).abs().max().item() for k, v in initial.items() if k in final)
    out["notes"].append(f"largest weight change {changed:.1e}")
    if not changed > 0:
        out["problems"].append("the weights did not change")
    if "process_group_smoke" in spec:
        out["notes"].append("training process group: " + (", ".join(backends) or "none (world size 1)"))
        out["notes"].append(process_group_smoke(spec["process_group_smoke"], device))
    return out


def process_group_smoke(backend: str, device: str) -> str:
    """All-reduce a tensor and take one DDP step over `backend`; the DDP gradients must equal plain ones."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group(backend=backend)
    try:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else "cpu")
        x = torch.arange(4.0, device=dev)
        dist.all_reduce(x)
        if not torch.equal(x.cpu(), torch.arange(4.0) * dist.get_world_size()):
            raise AssertionError(f"all_reduce gave {x.tolist()}")
        torch.manual_seed(0)
        plain = torch.nn.Linear(8, 4).to(dev)
        wrapped = DDP(torch.nn.Linear(8, 4).to(dev), device_ids=[dev.index] if dev.type == "cuda" else None)
        wrapped.module.load_state_dict(plain.state_dict())
        data = torch.randn(16, 8, device=dev)
        plain(data).square().mean().backward()
        wrapped(data).square().mean().backward()
        for a, b in zip(plain.parameters(), wrapped.module.parameters(), strict=False):
            torch.testing.assert_close(a.grad, b.grad)
        version = f", NCCL {nccl_version()}" if backend == "nccl" else ""
        return f"{backend}: all_reduce and DDP gradients ok (world size {dist.get_world_size()}{version})"
    finally:
        dist.destroy_process_group()


def child_bench(spec: dict) -> dict:
    """bench_step.main(argv) in this process (it prints its table); then the peak memory over all variants."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_step

    _peak_start()
    bench_step.main(spec["argv"])
    return dict(peak_gib=_peak_gib(spec["device"]), problems=[])


def _scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "log" / "train"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Fewer steps and one bench shape (about 3 minutes on GPU).")
    p.add_argument(
        "--out",
        default=str(REPO / "runs" / "gpu_check"),
        help="Folder for table.md, results.json and log.txt (every check's output).",
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: run everything that does not need CUDA, at tiny sizes.",
    )
    p.add_argument("--dry_run", action="store_true", help="Print the checks and their commands; run nothing.")
    p.add_argument(
        "--data",
        default="auto",
        help="auto (the real sample in ../shared/data if present, else synthetic), synthetic, or a "
        "binarized bert-base-uncased pickle.",
    )
    p.add_argument("--only", nargs="+", default=None, help="Run only these checks (names as in --dry_run).")
    p.add_argument("--timeout", type=int, default=None, help="Seconds per check (default: by mode).")
    p.add_argument("--child", choices=["train", "bench"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the checks (or print the plan with --dry_run); returns one Result per check."""
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        result = child_train(spec) if args.child == "train" else child_bench(spec)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return []
    if args.data not in ("auto", "synthetic") and not Path(args.data).is_file():
        raise UserError(f"--data {args.data}: no such file")

    import torch

    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        raise UserError(
            "no CUDA device visible to torch: run on a GPU machine, or pass --device cpu "
            "(everything but CUDA) or --dry_run (the plan)"
        )
    sizes = sizes_for(args.device, args.quick)
    timeout_s = args.timeout or sizes.timeout_s
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        if args.dry_run:
            ws = Workspace(
                work / "teacher",
                work / "student.json",
                work / "student.pth",
                work / "map.nm",
                work / "corpus.pickle",
                work / "counts.pickle",
                args.data,
            )
        else:
            logger.info("Building the random models and the corpus in %s", work)
            ws = build_workspace(work, sizes, args.data)
        checks = plan(args, sizes, ws, work)
        if args.only:
            unknown = set(args.only) - {c.name for c in checks}
            if unknown:
                raise UserError(f"--only: unknown check(s) {sorted(unknown)}; known: {[c.name for c in checks]}")
            checks = [c for c in checks if c.name in args.only]
        if args.dry_run:
            print(format_plan(checks, sizes, args, timeout_s))
            return [Result(c.name, "skip" if c.skip else "planned", notes=c.skip) for c in checks]

        out.mkdir(parents=True, exist_ok=True)
        results = []
        with open(out / "log.txt", "w") as log:
            for check in checks:
                if check.skip:
                    results.append(Result(check.name, "skip", notes=check.skip))
                    continue
                if check.spec_path is not None:
                    check.spec_path.write_text(json.dumps(check.spec))
                logger.info("Running %s (timeout %d s)", check.name, timeout_s)
                rc, text, seconds = run_check(check, timeout_s, log)
                results.append(result_of(check.name, rc, text, seconds, timeout_s))
                logger.info("%s: %s in %.0f s", check.name, results[-1].status, seconds)
        env = environment(args.device)
        env["data"] = ws.data
        table = format_table(results, env)
        (out / "table.md").write_text(table + "\n")
        (out / "results.json").write_text(
            json.dumps(dict(environment=env, sizes=asdict(sizes), results=[asdict(r) for r in results]), indent=1)
        )
        print(table)
    return results


def format_plan(checks: list[Check], sizes: Sizes, args: argparse.Namespace, timeout_s: int) -> str:
    lines = [
        f"gpu_check plan: device {args.device}{', quick' if args.quick else ''}, data {args.data}, "
        f"timeout {timeout_s} s per check; sizes {asdict(sizes)}"
    ]
    for c in checks:
        lines.append(f"- {c.name}: {c.verifies}" + (f" [skip: {c.skip}]" if c.skip else ""))
        lines.append(f"    $ {c.shows or shlex.join(c.command)}")
    return "\n".join(lines)


def cli() -> None:
    results = main()
    if any(r.status == "fail" for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(cli)
