"""`gpu_check.py`'s report: the result line each check's child prints, the parsers of what the checks
print (pytest's summary, bench_step's table), and the Markdown table."""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass

RESULT_TAG = "GPU_CHECK_RESULT "


@dataclass
class Result:
    name: str
    status: str  # pass / fail / skip
    seconds: float = 0.0
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    loss: str = ""  # "first -> last"
    notes: str = ""


def result_of(name: str, rc: int | None, out: str, seconds: float, timeout_s: int) -> Result:
    """Turn the exit status and output of the check `name` into a table row."""
    r = Result(name, "pass" if rc == 0 else "fail", seconds)
    if rc is None:
        r.notes = f"timed out after {timeout_s} s"
        return r
    if name == "cuda_tests":
        counts = parse_pytest_summary(out)
        r.notes = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
        if rc == 0 and counts.get("skipped") and not counts.get("passed"):
            r.status = "fail"  # on a GPU machine every CUDA test must run
            r.notes += " (all skipped: CUDA not seen by pytest?)"
        return r
    child = parse_result_line(out)
    if child is None:
        r.status, r.notes = "fail", last_error_line(out) or f"exit {rc}, no result line"
        return r
    r.peak_gib = child.get("peak_gib")
    problems = child.get("problems", [])
    if problems or rc != 0:
        r.status = "fail"
    if name.startswith("bench_step"):
        table = parse_bench_table(out)
        peak = parse_bench_peak(out)
        if "diito" in table:
            r.tokens_per_s, r.mfu = table["diito"]["tokens_per_s"], table["diito"]["mfu"]
        ratios = " / ".join(f"{name} {row['x_plain']:.2f}x ({row['mfu']:.0%})" for name, row in table.items())
        r.notes = f"x plain (MFU): {ratios}" + (f"; matmul peak {peak:.0f} GFLOP/s" if peak else "")
        if not table:
            r.status, r.notes = "fail", "no bench_step table in the output"
    else:
        r.tokens_per_s = child.get("tokens_per_s")
        if child.get("losses"):
            r.loss = f"{child['losses'][0]:.3f} -> {child['losses'][-1]:.3f}"
        r.notes = "; ".join(child.get("notes", []))
    if problems:
        r.notes = "; ".join(problems) + (f"; {r.notes}" if r.notes else "")
    return r


# --- parsing what the checks print ---------------------------------------------------------------


def parse_result_line(text: str) -> dict | None:
    """The last `GPU_CHECK_RESULT {json}` line a child printed (torchrun may prefix it), or None."""
    found = None
    for line in text.splitlines():
        i = line.find(RESULT_TAG)
        if i >= 0:
            try:
                found = json.loads(line[i + len(RESULT_TAG) :])
            except json.JSONDecodeError:
                continue
    return found


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line, e.g. `4 passed, 1 skipped in 12.3s` -> {passed: 4, skipped: 1}."""
    for line in reversed(text.splitlines()):
        if re.search(r"\d+ (passed|failed|skipped|error|errors|deselected)\b", line) and " in " in line:
            counts = {}
            for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line):
                counts["errors" if kind.startswith("error") else kind] = int(n)
            return counts
    return {}


def parse_bench_table(text: str) -> dict[str, dict[str, float]]:
    """bench_step.py's step table: {variant: {seconds, tokens_per_s, x_plain, mfu}}."""
    rows: dict[str, dict[str, float]] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| step |"):
            header = cells
            continue
        if header is None or not line.startswith("|") or set(cells[0]) <= {"-"}:
            if header is not None and rows and not line.startswith("|"):
                break  # the end-to-end table that may follow has other columns
            continue
        row = dict(zip(header, cells, strict=False))
        rows[row["step"]] = dict(
            seconds=float(row["s/step"]),
            tokens_per_s=float(row["tokens/s"].replace(",", "")),
            x_plain=float(row["x plain"].rstrip("x")),
            mfu=float(row["MFU"].rstrip("%")) / 100,
        )
    return rows


def parse_bench_peak(text: str) -> float | None:
    m = re.search(r"matmul peak ([\d.]+) GFLOP/s", text)
    return float(m.group(1)) if m else None


def last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"\w+(Error|Exception)\b", line):
            return line[:200]
    return lines[-1][:200] if lines else ""


# --- the table -----------------------------------------------------------------------------------


def environment(device: str) -> dict[str, str]:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})",
            cuda=str(torch.version.cuda),
            nccl=nccl_version(),
            bf16=str(torch.cuda.is_bf16_supported()),
        )
    else:
        env.update(device=f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return env


def nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(results: list[Result], env: dict[str, str]) -> str:
    lines = [
        ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| check | status | s | tokens/s | MFU | peak GiB | loss | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.status} | {r.seconds:.0f} | {_fmt(r.tokens_per_s, ',.0f')} | "
            f"{_fmt(r.mfu, '.0%')} | {_fmt(r.peak_gib, '.2f')} | {r.loss} | {r.notes.replace('|', '/')} |"
        )
    lines += [
        "",
        "tokens/s: training, median over logged steps after the first; bench_step: the DIITO (exact) "
        "step. MFU: bench_step's, against its measured matmul peak. peak GiB: torch.cuda.max_memory_allocated "
        "(CPU: the process's peak RSS). loss: losses/loss at the first and last step.",
    ]
    return "\n".join(lines)
