"""The quickstart's teacher stage (`scripts/fit_mlm_head.py`, its largest process) under glibc heap
settings: wall time and peak resident memory, one fresh process per setting, in one run.

    python benchmarks/bench_heap.py --steps 40 --repeats 2 --settings "glibc default" "trim after each step (shipped)"
    python benchmarks/bench_heap.py --steps 40        # every setting once, about 10 minutes on 2 cores
    python benchmarks/bench_heap.py --tiny            # a few steps of the --tiny quickstart

The corpus and data are the quickstart's own (stages 1-2, written to a temporary folder, removed
afterwards); each process then runs the recipe's teacher stage with its settings and `--steps`.
With `--repeats N` the settings take turns N times; the table gives each setting's mean, with the
range of its runs.

* `trim after each step`: as shipped (`utils.trim_heap` after each optimizer step);
* `glibc default`: without the trim;
* `mmap threshold N`: without the trim, `MALLOC_MMAP_THRESHOLD_=N` (blocks of N bytes or more get
  their own mappings, returned when freed).

Peak: the process's VmHWM at its end (Linux).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: (environment, trim after each step)
SETTINGS = {
    "trim after each step (shipped)": ({}, True),
    "glibc default": ({}, False),
    "mmap threshold 64 KiB": ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False),
    "mmap threshold 4 MiB": ({"MALLOC_MMAP_THRESHOLD_": "4194304"}, False),
}

CHILD = """
import json, sys, time
from pathlib import Path
from quickstart_lib.pipeline import Pipeline
from quickstart_lib.settings import Settings
from scripts import fit_mlm_head
settings, out, trim = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
if not trim:
    fit_mlm_head.trim_heap = lambda: None
s = Settings(**settings)
pipeline = Pipeline(out, s, False, [s.seed], [1.0])
start = time.time()
pipeline.recipe.make_teacher()
seconds = time.time() - start
kb = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"seconds": seconds, "peak_mb": kb / 1024}))
"""


def main(argv: list[str] | None = None) -> dict[str, dict]:
    sys.path.insert(0, str(REPO))
    from quickstart_lib.pipeline import Pipeline
    from quickstart_lib.settings import TINY, Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="Teacher steps per setting.")
    p.add_argument("--tiny", action="store_true", help="The --tiny quickstart's corpus and batch size.")
    p.add_argument("--repeats", type=int, default=1, help="Rounds over the settings (they take turns).")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="Settings to run (default: all).")
    args = p.parse_args(argv)
    chosen = args.settings or list(SETTINGS)
    if "glibc default" not in chosen:
        chosen.append("glibc default")  # the ratios' reference
    s = Settings(**(TINY if args.tiny else {}))
    s = dataclasses.replace(s, teacher_steps=args.steps)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pipeline = Pipeline(out, s, False, [s.seed], [1.0])
        pipeline.make_corpus()
        pipeline.make_data()
        for name in [name for _ in range(args.repeats) for name in chosen]:
            env, trim = SETTINGS[name]
            child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(s)), tmp, "1" if trim else "0"],
                env={**child_env, **env},
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"{name}: the teacher stage failed:\n{done.stderr[-2000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {
        name: {key: sum(r[key] for r in rs) / len(rs) for key in ("seconds", "peak_mb")} | {"runs": rs}
        for name, rs in runs.items()
    }
    base = results["glibc default"]
    print(f"Teacher stage, {args.steps} steps of {s.teacher_batch_size}, one fresh process per setting:\n")
    print("| setting | runs | wall (s) | vs default | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["seconds"] / base["seconds"]
        walls = sorted(x["seconds"] for x in r["runs"])
        spread = f" ({walls[0]:.1f}–{walls[-1]:.1f})" if len(walls) > 1 else ""
        peaks = sorted(x["peak_mb"] for x in r["runs"])
        peak = f"{peaks[0]:.0f}–{peaks[-1]:.0f}" if len(peaks) > 1 and peaks[0] != peaks[-1] else f"{peaks[0]:.0f}"
        print(f"| {name} | {len(walls)} | {r['seconds']:.1f}{spread} | {ratio:.2f}x | {peak} |")
    return results


if __name__ == "__main__":
    main()
