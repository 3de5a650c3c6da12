"""Stage 7: the report of results.json -- `comparison.png` (training curves, `scripts/plot_runs.py`),
`seeds.png` (every seed's point), `data_efficiency.png` (with --data_multiples) and `summary.md`."""

from __future__ import annotations

from pathlib import Path

from quickstart_lib.recipes.base import Recipe
from quickstart_lib.settings import BASELINE, CAUSAL, VARIANT_LABELS
from quickstart_lib.statistics import CONFIDENCE, Metric
from scripts import plot_runs
from utils import atomic_path

REFERENCE_LABELS = {"teacher": "teacher: {name}", "extracted": "student at extraction (no training)"}


def write_report(
    results: dict,
    recipe: Recipe,
    first_runs: list[Path],
    plot: Path,
    seeds_plot: Path,
    data_plot: Path,
    summary: Path,
) -> None:
    """The plots and the summary of `results`; `first_runs` are the first seed's plain and DIITO run folders."""
    plot_runs.main(
        [
            *map(str, first_runs),
            "--labels",
            *(VARIANT_LABELS[v] for v in (BASELINE, CAUSAL)),
            "--output",
            str(plot),
            "--smoothing",
            "0.6",
            "--title",
            recipe.plot_title,
        ]
    )
    n = len(results["seeds"])
    labels = {m.key: m.label for m in recipe.metrics}
    scale = {m.key: 100.0 if m.percent else 1.0 for m in recipe.metrics}
    plot_runs.plot_paired(
        {
            labels[k]: {
                VARIANT_LABELS[v]: [scale[k] * x for x in results["paired"][k][v]["values"]] for v in (BASELINE, CAUSAL)
            }
            for k in labels
        },
        seeds_plot,
        title=f"{n} paired seed{'s' if n > 1 else ''}: each point one seed, lines join a pair, bars mean ± std",
    )
    if "data_efficiency" in results:
        eff = results["data_efficiency"]
        tokens = eff["training_tokens"]
        plot_runs.plot_scaling(
            {
                labels[k]: {
                    VARIANT_LABELS[BASELINE]: {
                        tokens[m]: [scale[k] * x for x in v["values"]] for m, v in row["plain"].items()
                    },
                    VARIANT_LABELS[CAUSAL]: {tokens["1"]: [scale[k] * x for x in row[CAUSAL]["values"]]},
                }
                for k, row in ((k, eff["metrics"][k]) for k in labels)
            },
            data_plot,
            xlabel="training tokens (base sequences)",
            title="Plain distillation with more data against DIITO at 1x",
        )
    write_summary(
        results,
        recipe,
        summary,
        plot.name,
        seeds_plot.name,
        data_plot.name if "data_efficiency" in results else None,
    )


def write_summary(
    results: dict, recipe: Recipe, path: Path, plot_name: str, seeds_plot: str, data_plot: str | None
) -> None:
    """summary.md: the models' table, the teacher check, the paired seeds and the data efficiency."""
    s, m = results["settings"], results["models"]
    seeds, metrics = results["seeds"], recipe.metrics
    n = len(seeds)
    mean_note = "" if n == 1 else f" (mean of {n} seeds)"
    names = {key: label.format(name=recipe.name) for key, label in REFERENCE_LABELS.items()}
    if recipe.control in m:
        names[recipe.control] = f"student, {recipe.lm_loss} loss only: no teacher signal (seed {seeds[0]})"
    names.update({BASELINE: f"student, plain distillation{mean_note}", CAUSAL: f"student, DIITO{mean_note}"})

    def cell(row: dict, metric: Metric) -> str:
        return metric.show(row[metric.key]) if metric.key in row else "–"

    lines = [
        "# Quickstart results",
        "",
        f"Held-out text: {results['corpus']['heldout']['sequences']} paragraphs "
        f"({results['corpus']['heldout']['tokens']} tokens); {recipe.heldout_text(results)}",
        "",
        "| model | layers | parameters | " + " | ".join(mt.label.replace("held-out ", "") for mt in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    u = results["unigram_baseline"]
    lines.append(
        f"| {recipe.unigram_label.format(top=u['top_token'])} | – | – | "
        + " | ".join(cell(u, mt) for mt in metrics)
        + " |"
    )
    for key, label in names.items():
        row = m[key]
        lines.append(
            f"| {label} | {row['layers']} | {row['parameters'] / 1e6:.1f}M | "
            + " | ".join(cell(row, mt) for mt in metrics)
            + " |"
        )
    tokens = results["corpus"]["train"]["tokens"]
    check = results["teacher_check"]
    metric = next(mt for mt in metrics if mt.key == check["metric"])
    verdict = ""
    if "control" in check:
        verdict = f"; the student trained without it reaches {metric.show(check['control'])}, so the teacher is " + (
            "ahead of it"
            if check["teacher_beats_control"]
            else "NOT ahead of it: the students can learn more from the corpus than from this teacher"
        )
    ratio = (
        "" if check["ratio_to_baseline"] is None else f" = {check['ratio_to_baseline']:.1f}x the context-free baseline"
    )
    lines += [
        "",
        f"Teacher check: {metric.label} {metric.show(check['teacher'])}{ratio}{verdict}.",
        "",
        f"Both students: {s['steps']} steps of {s['batch_size']} sequences from the same extracted "
        f"weights, on {results['corpus']['train']['sequences']} training paragraphs ({tokens} tokens), "
        f"learning rate {s['learning_rate']}, {recipe.recipe_text}; seed{'s' if n > 1 else ''} "
        f"{', '.join(map(str, seeds))} (a seed sets the data order and the dropout masks; both variants "
        "of a seed share it).",
        "",
        f"![training curves and held-out results]({plot_name})",
        "",
        "## Paired seeds",
        "",
        f"Per metric: mean ± standard deviation over the {n} seed{'s' if n > 1 else ''} of each variant, the "
        f"paired difference DIITO − plain (mean of the per-seed differences) with its {100 * CONFIDENCE:.0f} % "
        "confidence interval (Student t with n − 1 degrees of freedom), and the seeds on which each variant "
        "is better.",
        "",
        "| metric | plain distillation | DIITO | DIITO − plain "
        f"({100 * CONFIDENCE:.0f} % CI) | seeds won: DIITO / plain / tie |",
        "|---|---|---|---|---|",
    ]

    def mean_std(d: dict, mt: Metric) -> str:
        return mt.show(d["mean"]) + ("" if d["std"] is None else f" ± {mt.show(d['std'])}")

    for mt in metrics:
        row = results["paired"][mt.key]
        d = row["difference"]
        ci = "(no interval with 1 seed)" if d["ci"] is None else f"[{mt.show(d['ci'][0])}, {mt.show(d['ci'][1])}]"
        w = row["wins"]
        lines.append(
            f"| {mt.label} | {mean_std(row[BASELINE], mt)} | {mean_std(row[CAUSAL], mt)} "
            f"| {mt.show(d['mean'])} {ci} | {w[CAUSAL]} / {w[BASELINE]} / {w['tie']} |"
        )
    if n == 1:
        lines += ["", "With one seed no confidence interval can be computed: run with --seeds 2 or more."]
    lines += ["", f"![every seed's held-out scores]({seeds_plot})", ""]
    if data_plot is not None:
        eff = results["data_efficiency"]
        multiples = [f"{x:g}" for x in results["data_multiples"]]
        lines += [
            "## Data efficiency",
            "",
            "Plain distillation trained for m times the steps of the DIITO run (the same batch size, "
            "learning-rate schedule stretched over the longer run, the same student and seeds), so on m "
            f"times its training tokens (about {eff['training_tokens']['1']:.0f} base tokens at 1x); the "
            "corpus is small, so more steps revisit the same paragraphs. Means over seeds "
            f"{', '.join(map(str, eff.get('seeds', seeds)))}:",
            "",
            "| metric | DIITO 1x | " + " | ".join(f"plain {x}x" for x in multiples) + " | plain needs |",
            "|---|---|" + "---|" * len(multiples) + "---|",
        ]
        for mt in metrics:
            row = eff["metrics"][mt.key]
            need = (
                "does not within " + multiples[-1] + "x"
                if row["matching_multiple"] is None
                else f"{row['matching_multiple']:.2f}x"
            )
            lines.append(
                f"| {mt.label} | {mean_std(row[CAUSAL], mt)} | "
                + " | ".join(mean_std(row["plain"][x], mt) for x in multiples)
                + f" | {need} |"
            )
        lines += [
            "",
            *(f"- {eff['metrics'][mt.key]['statement']}" for mt in metrics),
            "",
            f"![held-out scores against training tokens]({data_plot})",
            "",
        ]
    if "mappings" in results:
        lines += mapping_lines(results["mappings"], metrics)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def mapping_lines(comparison: dict, metrics: tuple[Metric, ...]) -> list[str]:
    """The summary's section on DIITO with each other mapping, against the default mapping and plain."""
    default, seeds = comparison["default"], comparison["seeds"]
    ci = f"{100 * CONFIDENCE:.0f} % CI"
    lines = [
        "## Which mapping",
        "",
        f"DIITO with other neuron mappings, on seeds {', '.join(map(str, seeds))} (the same student, data order "
        f"and steps). `{default}` (the default): {comparison['descriptions'][default]}. Held-out interchange "
        "accuracy always intervenes at the default mapping's site.",
        "",
    ]

    def show(mt: Metric, d: dict) -> str:
        interval = "" if d["ci"] is None else f" [{mt.show(d['ci'][0])}, {mt.show(d['ci'][1])}]"
        return f"{mt.show(d['mean'])}{interval}"

    for name, rows in comparison["vs_default"].items():
        lines += [
            f"`{name}`: {comparison['descriptions'][name]}.",
            "",
            f"| metric | DIITO, {default} | DIITO, {name} | {name} − {default} ({ci}) | seeds won: "
            f"{name} / {default} / tie | {name} − plain ({ci}) |",
            "|---|---|---|---|---|---|",
        ]
        for mt in metrics:
            row, vs_plain = rows[mt.key], comparison["vs_plain"][name][mt.key]
            w = row["wins"]
            lines.append(
                f"| {mt.label} | {mt.show(row[default]['mean'])} | {mt.show(row[name]['mean'])} | "
                f"{show(mt, row['difference'])} | {w[name]} / {w[default]} / {w['tie']} | "
                f"{show(mt, vs_plain['difference'])} |"
            )
        lines.append("")
    return lines
