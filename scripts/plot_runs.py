"""Plot the TensorBoard scalars of one or more runs as PNG panels, one line per run.

    python scripts/plot_runs.py results/plain results/diito --labels plain DIITO --output runs.png

A run is a folder: a training dump (its `log/` holds the events) or any folder with event files
below it; every event file under it is read, so scalars written by later evaluations (e.g. the
quickstart's `log/heldout`) join the training curves. Default panels: the total loss, each
distillation loss, the causal loss, the interchange accuracy and the learning rate, each shown
when at least one run logged it, then every `heldout/*` scalar. A tag that every run logged once
(a final evaluation) is drawn as bars, one per run, with its value written on it.

Two more figures take numbers rather than runs (the quickstart calls them): `plot_paired`, every
seed's score per variant with the pairs joined, and `plot_scaling`, scores against training tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from utils import UserError, atomic_path, run_cli  # noqa: E402

logger = logging.getLogger("plot_runs")

# tag -> panel title, in panel order
DEFAULT_TAGS = {
    "losses/loss": "total loss",
    "losses/loss_ce": "distillation loss (ce)",
    "losses/loss_mlm": "MLM loss",
    "losses/loss_clm": "CLM loss",
    "losses/loss_cos": "hidden-state cosine loss",
    "losses/loss_causal_ce": "causal loss (causal_ce)",
    "losses/loss_causal_cos": "causal cosine loss",
    "metrics/interchange_accuracy": "interchange accuracy (training)",
    "learning_rate/lr": "learning rate",
}
EXTRA_PREFIXES = ("heldout/",)  # also plotted when present, after the default tags
EXTRA_TITLES = {
    "heldout/mlm_loss": "held-out MLM loss",
    "heldout/mlm_accuracy": "held-out MLM accuracy",
    "heldout/perplexity": "held-out perplexity",
    "heldout/accuracy": "held-out next-token accuracy",
    "heldout/teacher_agreement": "held-out agreement with teacher",
    "heldout/interchange_accuracy": "held-out interchange accuracy",
}
UNSMOOTHED_PREFIXES = ("learning_rate/",)  # schedules are exact: an average would only lag


@dataclass
class Series:
    steps: np.ndarray  # (n,) int
    values: np.ndarray  # (n,) float


def event_dirs(run: Path) -> list[Path]:
    """Folders under `run` (itself included) that hold TensorBoard event files."""
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    dirs = sorted({p.parent for p in run.rglob("events.out.tfevents.*")})
    if not dirs:
        raise UserError(f"no TensorBoard event files under {run}")
    return dirs


def read_scalars(run: Path) -> dict[str, Series]:
    """Every scalar tag of a run. Points from several files are merged by step; for a step logged
    twice (a resumed run repeats the steps after its last checkpoint) the latest write wins."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per file read otherwise

    points: dict[str, dict[int, tuple[float, float]]] = {}
    for folder in event_dirs(run):
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            by_step = points.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in by_step or e.wall_time >= by_step[e.step][0]:
                    by_step[e.step] = (e.wall_time, e.value)
    out = {}
    for tag, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = Series(steps, np.array([by_step[s][1] for s in steps], dtype=np.float64))
    return out


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased so the first points are not pulled to 0."""
    if weight <= 0 or len(values) < 2:
        return values
    out, avg = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def choose_tags(runs: list[dict[str, Series]], requested: list[str] | None) -> list[str]:
    present = set().union(*runs)
    if requested:
        missing = [t for t in requested if t not in present]
        if missing:
            raise UserError(f"no run logged {missing[0]!r}; logged tags include: {', '.join(sorted(present)[:12])}")
        return requested
    tags = [t for t in DEFAULT_TAGS if t in present]
    extra = [t for t in present if t.startswith(EXTRA_PREFIXES)]
    known = list(EXTRA_TITLES)
    tags += sorted(extra, key=lambda t: (known.index(t) if t in known else len(known), t))
    if not tags:
        raise UserError(
            f"none of the default tags was logged; pick some with --tags from: {', '.join(sorted(present))}"
        )
    return tags


def plot(
    runs: list[dict[str, Series]],
    labels: list[str],
    tags: list[str],
    output: Path,
    smoothing: float = 0.0,
    title: str | None = None,
    ncols: int = 4,
    dpi: int = 100,
) -> None:
    """Write one PNG with a panel per tag (lines vs step, or bars for single-point tags)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols, len(tags))
    nrows = -(-len(tags) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.7 * nrows + 0.6), squeeze=False, layout="constrained"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes.flat, tags, strict=False):
        logged = [(i, run[tag]) for i, run in enumerate(runs) if tag in run]
        ax.set_title(DEFAULT_TAGS.get(tag) or EXTRA_TITLES.get(tag, tag), fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if all(len(s.steps) == 1 for _, s in logged):
            xs = np.arange(len(logged))
            values = [float(s.values[0]) for _, s in logged]
            bars = ax.bar(xs, values, color=[colors[i % len(colors)] for i, _ in logged], width=0.6)
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
            ax.set_xticks(xs, [labels[i] for i, _ in logged], fontsize=8)
            ax.margins(y=0.15)
            continue
        weight = 0.0 if tag.startswith(UNSMOOTHED_PREFIXES) else smoothing
        for i, s in logged:
            color = colors[i % len(colors)]
            if weight > 0:
                ax.plot(s.steps, s.values, color=color, alpha=0.25, linewidth=0.8)
            marker = "o" if len(s.steps) == 1 else None  # a one-point line would draw nothing
            ax.plot(s.steps, smooth(s.values, weight), color=color, linewidth=1.5, label=labels[i], marker=marker)
        ax.set_xlabel("step", fontsize=8)
        if tag.startswith(UNSMOOTHED_PREFIXES):  # small values: label ticks 5e-04, not with an offset
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0e}" if v else "0")
    for ax in axes.flat[len(tags) :]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], linewidth=2) for i in range(len(runs))]
    fig.legend(handles, labels, loc="outside lower center", ncol=len(runs), frameon=False, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _figure(n_panels: int, ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols, n_panels)
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return plt, fig, axes.flat[:n_panels], plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(plt, fig, output: Path, title: str | None, dpi: int) -> None:
    if title:
        fig.suptitle(title, fontsize=12)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_paired(
    panels: dict[str, dict[str, list[float]]], output: Path, title: str | None = None, ncols: int = 4, dpi: int = 100
) -> None:
    """One panel per metric: every seed's value of each variant as a point, a grey line joining the
    values of one seed, and each variant's mean with its standard deviation as an error bar.

    panels: panel title -> variant label -> per-seed values (the same seed order in every variant).
    """
    plt, fig, axes, colors = _figure(len(panels), ncols)
    for ax, (name, variants) in zip(axes, panels.items(), strict=False):
        values = np.array(list(variants.values()), dtype=np.float64)  # (variants, seeds)
        xs = np.arange(len(variants))
        ax.plot(np.repeat(xs[:, None], values.shape[1], 1), values, color="0.6", linewidth=0.8, zorder=1)
        for i, row in enumerate(values):
            ax.scatter(np.full(len(row), xs[i]), row, color=colors[i % len(colors)], s=18, zorder=2)
            std = row.std(ddof=1) if len(row) > 1 else 0.0
            ax.errorbar(xs[i] + 0.12, row.mean(), yerr=std, color="k", marker="_", markersize=12, capsize=3, zorder=3)
        ax.set_xticks(xs, list(variants), fontsize=8)
        ax.set_xlim(-0.5, len(variants) - 0.5)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, output, title, dpi)


def plot_scaling(
    panels: dict[str, dict[str, dict[float, list[float]]]],
    output: Path,
    xlabel: str,
    title: str | None = None,
    ncols: int = 4,
    dpi: int = 100,
) -> None:
    """One panel per metric: each series' per-seed values (faint points) and mean (line and markers)
    against x; a series with one x (e.g. DIITO at 1x) is also drawn as a dashed horizontal line.

    panels: panel title -> series label -> {x: per-seed values}.
    """
    plt, fig, axes, colors = _figure(len(panels), ncols)
    labels = list(next(iter(panels.values())))
    for ax, (name, series) in zip(axes, panels.items(), strict=False):
        for label, points in series.items():
            color = colors[labels.index(label) % len(colors)]
            xs = sorted(points)
            for x in xs:
                ax.scatter(np.full(len(points[x]), x), points[x], color=color, alpha=0.35, s=14)
            means = [float(np.mean(points[x])) for x in xs]
            ax.plot(
                xs,
                means,
                color=color,
                marker="o" if len(xs) > 1 else "*",
                markersize=5 if len(xs) > 1 else 11,
                linewidth=1.5,
                label=label,
            )
            if len(xs) == 1:
                ax.axhline(means[0], color=color, linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], linewidth=2) for i in range(len(labels))]
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=10)
    _save(plt, fig, output, title, dpi)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="Run folders (a causal_train.py dump, or any folder with event files).")
    p.add_argument("--labels", nargs="+", default=None, help="One legend label per run (default: folder names).")
    p.add_argument("--output", default="runs.png", help="PNG file to write.")
    p.add_argument("--tags", nargs="+", default=None, help="Scalar tags to plot (default: losses, metrics, lr).")
    p.add_argument(
        "--smoothing",
        type=float,
        default=0.0,
        help="Exponential moving average weight in [0, 1) for the curves (raw points stay faint).",
    )
    p.add_argument("--title", default=None)
    p.add_argument("--ncols", type=int, default=4, help="Panels per row.")
    p.add_argument("--dpi", type=int, default=100)
    args = p.parse_args(argv)
    labels = args.labels or [Path(r).resolve().name for r in args.runs]
    if len(labels) != len(args.runs):
        raise UserError(f"{len(labels)} --labels for {len(args.runs)} runs")
    if not 0 <= args.smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if args.ncols < 1 or args.dpi < 1:
        raise UserError("--ncols and --dpi must be >= 1")
    runs = [read_scalars(Path(r)) for r in args.runs]
    tags = choose_tags(runs, args.tags)
    output = Path(args.output)
    plot(runs, labels, tags, output, smoothing=args.smoothing, title=args.title, ncols=args.ncols, dpi=args.dpi)
    logger.info("Plotted %d tags of %d runs -> %s", len(tags), len(runs), output)
    return output


if __name__ == "__main__":
    run_cli(main)
