"""Fine-tune and evaluate one or more models on the GLUE tasks and print the README's score table.

    python scripts/eval_glue_suite.py --model DIITO=./results/diito/ --model DistilBERT=./results/distilbert/ \
        --tokenizer_name bert-base-uncased --output_dir ./glue_results/

Each (model, task) runs `run_glue.main` in this process with the original README's settings
(max_seq_length 128, batch 32 per device, learning rate 2e-5, 3 epochs, save_total_limit 1);
any option this script does not know is passed on to run_glue.py (e.g. `--max_steps 10 --use_cpu`).
Runs go to `<output_dir>/<label>/<task>/`; the table goes to stdout and `<output_dir>/glue_results.md`,
every metric of every run to `<output_dir>/glue_results.json`.

A task's score is its GLUE metric x 100; tasks with two metrics score their mean, as the GLUE
benchmark averages them: MRPC (F1 + accuracy), QQP (accuracy + F1), STS-B (Pearson + Spearman).
MNLI scores the matched accuracy (mismatched stays in the JSON). Average-score is the mean over
the tasks in the table.

Offline, `--glue_dir DIR` reads `DIR/<task>/train.{csv,json,jsonl}` and `validation.*`
(MNLI: `validation_matched.*` and `validation_mismatched.*`) with the Hub's column names.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_common  # noqa: E402  (needs the repository root on the path)
import run_glue  # noqa: E402
from utils import UserError, atomic_path, run_cli, write_json  # noqa: E402

logger = logging.getLogger(__name__)

# Table column, and the run_glue metrics averaged into the task's score; in the README's order.
task_columns = {
    "cola": ("CoLA", ("eval_matthews_correlation",)),
    "mnli": ("MNLI", ("eval_accuracy",)),
    "mrpc": ("MRPC", ("eval_f1", "eval_accuracy")),
    "qnli": ("QNLI", ("eval_accuracy",)),
    "qqp": ("QQP", ("eval_accuracy", "eval_f1")),
    "rte": ("RTE", ("eval_accuracy",)),
    "sst2": ("SST-2", ("eval_accuracy",)),
    "stsb": ("STS-B", ("eval_pearson", "eval_spearmanr")),
    "wnli": ("WNLI", ("eval_accuracy",)),
}
DEFAULT_TASKS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]  # the README's table

# Split -> run_glue flag naming its file, for the --glue_dir layout.
split_flags = {
    "train": "--train_file",
    "validation": "--validation_file",
    "validation_matched": "--validation_file",
    "validation_mismatched": "--validation_mismatched_file",
}
DATA_SUFFIXES = (".csv", ".json", ".jsonl")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a model to evaluate: dump folder or Hub name, optionally labelled (repeatable)",
    )
    parser.add_argument("--output_dir", required=True, help="runs go to OUTPUT_DIR/<label>/<task>/")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, help="GLUE tasks (default: the README's eight)")
    parser.add_argument(
        "--tokenizer_name",
        help="tokenizer name or path (needed only for distillation dumps made before runs saved their tokenizer)",
    )
    parser.add_argument("--glue_dir", help="local data: GLUE_DIR/<task>/train.csv, validation.csv, ...")
    parser.add_argument("--results_file", help="markdown table (default: OUTPUT_DIR/glue_results.md)")
    parser.add_argument("--cache_dir", help="cache for downloaded models and data sets")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    args, passthrough = parser.parse_known_args(argv)
    unknown = [t for t in args.tasks if t not in task_columns]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose among {', '.join(task_columns)}")
    return args, passthrough


def parse_model(entry: str) -> tuple[str, str]:
    """'label=path' -> (label, path); a bare path is labelled with its last component."""
    label, sep, path = entry.partition("=")
    if not sep:
        path, label = entry, Path(entry.rstrip("/")).name
    if not label or not path:
        raise UserError(f"--model {entry!r}: expected LABEL=PATH or PATH")
    return label, path


def glue_dir_files(glue_dir: Path, task: str) -> list[str]:
    """run_glue flags for the task's files in glue_dir; a missing train or validation file is an error."""
    wanted = ["train"] + (["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"])
    flags = []
    for split in wanted:
        found = [glue_dir / task / f"{split}{s}" for s in DATA_SUFFIXES if (glue_dir / task / f"{split}{s}").is_file()]
        if not found:
            raise UserError(f"no {split} file for {task} in {glue_dir / task} (expected {split}.csv, .json or .jsonl)")
        flags += [split_flags[split], str(found[0])]
    return flags


def task_score(task: str, metrics: dict) -> float:
    """The task's table score: mean of its metrics, x 100."""
    keys = task_columns[task][1]
    return 100.0 * sum(metrics[k] for k in keys) / len(keys)


def format_table(scores: dict[str, dict[str, float | None]], tasks: list[str]) -> str:
    """Markdown table in the README's format: Model | Average-score | one column per task."""
    tasks = [t for t in task_columns if t in tasks]
    header = ["Model", "Average-score"] + [task_columns[t][0] for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + " :---: |" * len(header)]
    for label, row in scores.items():
        present = [row[t] for t in tasks if row.get(t) is not None]
        average = f"**{sum(present) / len(present):.2f}**" if present else "(-)"
        cells = [label, average] + [f"{row[t]:.2f}" if row.get(t) is not None else "(-)" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    args, passthrough = parse_args(argv)
    models = [parse_model(entry) for entry in args.model]
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"two --model entries share a label: {labels}")
    output_dir = Path(args.output_dir)
    results_file = Path(args.results_file) if args.results_file else output_dir / "glue_results.md"
    eval_common.check_writable_dir(output_dir, "--output_dir")  # before hours of fine-tuning, not after
    eval_common.check_writable_dir(results_file.parent, "--results_file's folder")
    data_flags = {t: glue_dir_files(Path(args.glue_dir), t) if args.glue_dir else [] for t in args.tasks}
    for label, path in models:  # a typo in the last model must not wait for the first ones to train
        folder = eval_common.local_folder(path, f"--model {label}")
        if folder is not None and not (folder / "config.json").is_file():
            raise UserError(f"--model {label}={path}: no config.json in {path}")

    common = [
        "--do_train",
        "--do_eval",
        "--save_total_limit",
        "1",
        "--max_seq_length",
        str(args.max_seq_length),
        "--per_device_train_batch_size",
        str(args.per_device_train_batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--num_train_epochs",
        str(args.num_train_epochs),
    ]
    common += ["--tokenizer_name", args.tokenizer_name] if args.tokenizer_name else []
    common += ["--cache_dir", args.cache_dir] if args.cache_dir else []

    scores, all_metrics = {}, {}
    for label, path in models:
        scores[label], all_metrics[label] = {}, {}
        for task in args.tasks:
            logger.info(f"GLUE suite: {label} on {task}")
            run_argv = (
                ["--model_name_or_path", path, "--task_name", task, "--output_dir", str(output_dir / label / task)]
                + common
                + data_flags[task]
                + passthrough
            )
            metrics = run_glue.main(run_argv)
            all_metrics[label][task] = metrics
            scores[label][task] = task_score(task, metrics)

    table = format_table(scores, args.tasks)
    with atomic_path(results_file) as tmp:
        tmp.write_text(table)
    write_json({"scores": scores, "metrics": all_metrics}, output_dir / "glue_results.json")
    print(table, end="")
    logger.info(f"Table written to {results_file}")
    return table


if __name__ == "__main__":
    run_cli(main)
