"""The held-out metrics a recipe reports (`Metric`) and the statistics over paired seeds: per-variant
mean and standard deviation, the paired difference DIITO - plain with a Student-t interval, the seeds
each variant wins, the multiple of data plain distillation needs to match DIITO, and the teacher check."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quickstart_lib.settings import BASELINE, CAUSAL, RunKey

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    """A held-out score of a student, as results.json names it and the report shows it."""

    key: str
    label: str
    higher_is_better: bool
    percent: bool = False  # shown x100 in the report
    fmt: str = ".3f"  # format of a value that is not a percentage

    def show(self, value: float) -> str:
        return f"{100 * value:.2f}" if self.percent else format(value, self.fmt)

    def better(self, a: float, b: float) -> bool:
        """a is strictly better than b."""
        return a > b if self.higher_is_better else a < b


def describe(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for one value) of per-seed values."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "values": [float(v) for v in a],
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else None,
    }


def paired_comparison(
    plain: list[float], diito: list[float], metric: Metric, names: tuple[str, str] = (BASELINE, CAUSAL)
) -> dict:
    """Per-variant mean ± std, the paired difference DIITO - plain (seed by seed) with a Student-t
    CONFIDENCE interval (None with one seed), and how many seeds each variant wins. `names` are the
    keys of the two variants (another pair, e.g. two mappings of DIITO, is compared the same way)."""
    from scipy import stats

    a_name, b_name = names
    d = describe([b - a for a, b in zip(plain, diito, strict=True)])
    n = len(plain)
    if n > 1:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * d["std"] / math.sqrt(n)
        d["ci"] = [d["mean"] - half, d["mean"] + half]
    else:
        d["ci"] = None
    d["confidence"] = CONFIDENCE
    wins = {
        b_name: sum(metric.better(b, a) for a, b in zip(plain, diito, strict=False)),
        a_name: sum(metric.better(a, b) for a, b in zip(plain, diito, strict=False)),
    }
    wins["tie"] = n - wins[a_name] - wins[b_name]
    return {
        a_name: describe(plain),
        b_name: describe(diito),
        "difference": d,
        "wins": wins,
        "higher_is_better": metric.higher_is_better,
    }


def matching_multiple(multiples: list[float], plain: list[float], target: float, metric: Metric) -> float | None:
    """The smallest multiple of data at which plain distillation's curve (`plain[i]` at `multiples[i]`,
    increasing, linear in between) reaches `target`; None when it does not within the largest.
    multiples[0] when it already does there (the target is no better than plain at equal data)."""

    def reached(v: float) -> bool:
        return not metric.better(target, v)

    if reached(plain[0]):
        return multiples[0]
    steps = zip(zip(multiples, plain, strict=True), zip(multiples[1:], plain[1:], strict=True), strict=False)
    for (m0, v0), (m1, v1) in steps:
        if reached(v1):
            return m0 + (target - v0) / (v1 - v0) * (m1 - m0)
    return None


def data_efficiency(runs: dict, seeds: list[int], multiples: list[float], metric: Metric) -> dict:
    """Plain distillation at every multiple against DIITO at 1x, on the mean curve and seed by seed."""
    plain = {m: describe([runs[RunKey(BASELINE, s, m).path][metric.key] for s in seeds]) for m in multiples}
    diito = describe([runs[RunKey(CAUSAL, s).path][metric.key] for s in seeds])
    mean = matching_multiple(multiples, [plain[m]["mean"] for m in multiples], diito["mean"], metric)
    per_seed = [
        matching_multiple(multiples, [plain[m]["values"][i] for m in multiples], diito["values"][i], metric)
        for i in range(len(seeds))
    ]
    top = f"{multiples[-1]:g}x"
    found = [m for m in per_seed if m is not None]
    spread = f"{len(found)} of {len(seeds)} seeds match within {top}" + (
        f", at {min(found):.2f}x to {max(found):.2f}x" if found else ""
    )
    if mean is None:
        statement = f"{metric.label}: plain distillation does not match DIITO within {top} the data ({spread})"
    elif mean == multiples[0]:
        statement = (
            f"{metric.label}: plain distillation matches DIITO already at {multiples[0]:g}x "
            f"(DIITO is no better; {spread})"
        )
    else:
        statement = f"{metric.label}: plain distillation needs {mean:.2f}x the data to match DIITO ({spread})"
    return {
        "plain": {f"{m:g}": v for m, v in plain.items()},
        CAUSAL: diito,
        "matching_multiple": mean,
        "matching_multiple_per_seed": per_seed,
        "statement": statement,
        "higher_is_better": metric.higher_is_better,
    }


def teacher_check(models: dict, unigram: dict, metric: Metric, control: str | None = None) -> dict:
    """Is the teacher worth distilling? Its held-out accuracy against the context-free baseline's
    (as a ratio) and against the student trained without a teacher (`models[control]`, if any)."""
    teacher = models["teacher"][metric.key]
    check = {
        "metric": metric.key,
        "teacher": teacher,
        "unigram_baseline": unigram[metric.key],
        "ratio_to_baseline": teacher / unigram[metric.key] if unigram[metric.key] > 0 else None,
    }
    if control in models:
        check["control"] = models[control][metric.key]
        check["teacher_beats_control"] = metric.better(teacher, check["control"])
    return check
