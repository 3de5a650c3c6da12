"""The quickstart's stages in order, over the output folder: each is skipped when its outputs exist
and nothing it depends on ran again, so an interrupted run continues where it stopped.

1 corpus, 2 data (`scripts/binarized_data.py`, `scripts/token_counts.py`), 3 teacher and 4 student (the
recipe's), 5 train (`causal_train.py` in a child process, per run), 6 evaluate (the recipe's held-out
scores, then results.json with the statistics over seeds), 7 report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quickstart_lib import report
from quickstart_lib.corpus import build_corpus, write_lines
from quickstart_lib.memory import peak_rss_mb, release_memory, reset_peak_rss, wait_with_peak_rss
from quickstart_lib.recipes import RECIPES
from quickstart_lib.settings import BASELINE, CAUSAL, RunKey, Settings
from quickstart_lib.statistics import data_efficiency, paired_comparison, teacher_check
from scripts import binarized_data, token_counts
from token_store import load_sequences
from utils import UserError, require_no_symlink_loop, write_json

logger = logging.getLogger("quickstart")
REPO = Path(__file__).resolve().parent.parent


# Written first into every quickstart output folder: what marks a folder as the quickstart's own.
OUTPUT_MARKER = ".quickstart_output"
OUTPUT_MARKER_TEXT = "An output folder of quickstart.py (DIITO); settings.json holds its settings.\n"
# What a quickstart folder holds at its top: a folder made before the marker existed is recognised
# when its settings.json holds quickstart settings and it holds nothing else.
OUTPUT_NAMES = (
    "settings.json",
    "corpus",
    "base",
    "data",
    "teacher",
    "student",
    "runs",
    "eval",
    "results.json",
    "comparison.png",
    "seeds.png",
    "data_efficiency.png",
    "summary.md",
    OUTPUT_MARKER,
)


def prepare_output_dir(out: Path, s: Settings, force: bool) -> None:
    """Create the folder, or check that it is a quickstart folder (it holds `OUTPUT_MARKER`) made with
    the same settings. An older quickstart folder (settings.json, no marker) is taken over, marker
    written, only if it holds nothing the quickstart does not write; any other folder is refused."""
    require_no_symlink_loop(out, "--output_dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    settings_file, marker = out / "settings.json", out / OUTPUT_MARKER
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not marker.is_file():
        strangers = [n for n in names if n not in OUTPUT_NAMES]
        if "settings.json" not in names or strangers:
            why = f"it holds {strangers[0]}" if "settings.json" in names else "no settings.json"
            raise UserError(
                f"{out} exists and is not a quickstart output folder (no {OUTPUT_MARKER}, {why}): "
                "choose another --output_dir"
            )
    previous = None
    if settings_file.exists():
        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"cannot read {settings_file}: {e}; choose another --output_dir") from None
        fields = {f.name for f in dataclasses.fields(Settings)}
        if not isinstance(previous, dict) or not set(previous) <= fields:
            raise UserError(
                f"{settings_file} does not hold quickstart settings: {out} is not a quickstart output folder; "
                "choose another --output_dir"
            )
    if previous is not None and not force:
        previous = {**dataclasses.asdict(Settings()), **previous}
        changed = {k: (previous.get(k), v) for k, v in dataclasses.asdict(s).items() if previous.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(
                f"{out} was made with other settings ({what}): pass --force to redo it, or choose another --output_dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not marker.is_file():
            marker.write_text(OUTPUT_MARKER_TEXT)
        write_json(dataclasses.asdict(s), settings_file)
    except OSError as e:
        raise UserError(f"cannot write in --output_dir {out}: {e.strerror or e}") from None


def run_training(argv: list[str]) -> tuple[int, float | None]:
    """`python causal_train.py ARGV` in a child process; its exit status and peak resident memory (MB).

    The quickstart drives the training CLI as a user would, rather than importing the entry point.
    """
    return wait_with_peak_rss(subprocess.Popen([sys.executable, str(REPO / "causal_train.py"), *argv]))


class Pipeline:
    """The stages, in order, sharing the output folder layout."""

    def __init__(
        self,
        out: Path,
        s: Settings,
        force: bool,
        seeds: list[int],
        multiples: list[float],
        teacher_dir: str | None = None,
        mappings: list[str] | None = None,
        extra_run_seeds: int | None = None,
    ):
        """`multiples` (1 first) and the non-default `mappings` add plain-distillation and DIITO runs for
        the first `extra_run_seeds` seeds (all by default)."""
        self.out, self.s, self.force = out, s, force
        self.seeds, self.multiples = seeds, multiples
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # per stage run: the larger of this process's and its child's
        self.child_peak_mb: float | None = None  # the current stage's training child's
        self.ran: set[str] = set()  # stages run in this call
        self.corpus = {split: out / "corpus" / f"{split}.txt" for split in ("train", "heldout")}
        self.recipe = RECIPES[s.teacher](out, s, teacher_dir)
        self.counts = self.recipe.counts
        self.mappings = [m for m in mappings or [] if m != self.recipe.default_mapping]
        self.extra_seeds = seeds[:extra_run_seeds]
        self.keys = [RunKey(v, seed) for seed in seeds for v in (BASELINE, CAUSAL)]
        self.keys += [RunKey(BASELINE, seed, m) for seed in self.extra_seeds for m in multiples if m != 1]
        self.keys += [RunKey(CAUSAL, seed, mapping=m) for seed in self.extra_seeds for m in self.mappings]
        if self.recipe.control is not None:
            self.keys.append(RunKey(self.recipe.control, seeds[0]))
        self.reference = out / "eval" / "reference.json"
        self.results = out / "results.json"
        self.plot = out / "comparison.png"
        self.seeds_plot = out / "seeds.png"
        self.data_plot = out / "data_efficiency.png"
        self.summary = out / "summary.md"

    @property
    def data(self) -> dict[str, Path]:
        """The binarized splits (the recipe's: their names depend on its tokenizer)."""
        return self.recipe.data

    def run_dir(self, key: RunKey) -> Path:
        return self.out / "runs" / key.path

    def eval_file(self, key: RunKey) -> Path:
        return self.out / "eval" / f"{key.path}.json"

    def stale(self, deps: tuple[str, ...]) -> bool:
        """Outputs are stale with --force or when a stage they depend on ran in this call."""
        return self.force or any(d in self.ran for d in deps)

    def stage(
        self,
        n: int,
        name: str,
        outputs: list[Path],
        fn: Callable[[], None],
        deps: tuple[str, ...],
        current: Callable[[], bool] = lambda: True,
    ) -> None:
        """Run `fn` unless all `outputs` exist, are not stale and are `current`."""
        if not self.stale(deps) and all(p.exists() for p in outputs) and current():
            logger.info("[%d/7] %s: done already, skipped", n, name)
            return
        logger.info("[%d/7] %s ...", n, name)
        reset_peak_rss()
        self.child_peak_mb = None
        start = time.time()
        fn()
        self.timings[name] = round(time.time() - start, 1)
        self.ran.add(name)
        peaks = [mb for mb in (peak_rss_mb(), self.child_peak_mb) if mb is not None]
        release_memory()
        if peaks:
            self.peak_rss_mb[name] = round(max(peaks))
        logger.info("[%d/7] %s: %.0fs, peak memory %s MB", n, name, self.timings[name], self.peak_rss_mb.get(name, "?"))

    def run(self) -> dict:
        r = self.recipe
        self.stage(1, "corpus", list(self.corpus.values()), self.make_corpus, ())
        if r.source_outputs:  # the pretrained model brings the tokenizer the data is binarized with
            self.stage(3, "base model", r.source_outputs, r.make_source, ())
        self.stage(2, "data", [*self.data.values(), self.counts], self.make_data, ("corpus", "base model"))
        self.stage(3, "teacher", r.teacher_outputs, r.make_teacher, ("data",))
        self.stage(4, "student", r.student_outputs, r.make_student, ("teacher",))
        prepared = ("data", "teacher", "student")
        for key in self.keys:
            # An interrupted run whose inputs are unchanged resumes from its last checkpoint.
            self.stage(
                5,
                f"train {key.path}",
                [self.run_dir(key) / "pytorch_model.bin"],
                lambda key=key: self.train(key, resume=not self.stale(prepared)),
                prepared,
            )
        self.stage(
            6,
            "evaluate references",
            [self.reference],
            lambda: write_json(r.evaluate_references(), self.reference),
            prepared,
        )
        for key in self.keys:
            self.stage(
                6,
                f"evaluate {key.path}",
                [self.eval_file(key)],
                lambda key=key: self.evaluate(key),
                (*prepared, f"train {key.path}"),
            )
        evaluated = ("evaluate references", *(f"evaluate {key.path}" for key in self.keys))
        self.stage(6, "results", [self.results], self.collect, evaluated, current=self.results_cover_the_runs)
        reports = [self.plot, self.seeds_plot, self.summary] + ([self.data_plot] if len(self.multiples) > 1 else [])
        self.stage(7, "report", reports, self.report, ("results",))
        logger.info("Results: %s, %s, %s", self.summary, self.seeds_plot, self.results)
        return json.loads(self.results.read_text())

    def results_cover_the_runs(self) -> bool:
        previous = json.loads(self.results.read_text())
        return (
            set(previous.get("runs", {})) == {key.path for key in self.keys}
            and previous.get("data_multiples") == self.multiples
        )

    # --- stages -------------------------------------------------------------------------------

    def make_corpus(self) -> None:
        train, heldout = build_corpus(self.s)
        if len(train) < 2 * self.s.batch_size or not heldout:
            raise UserError(f"the corpus is too small ({len(train)} training, {len(heldout)} held-out paragraphs)")
        write_lines(heldout, self.corpus["heldout"])
        write_lines(train, self.corpus["train"])
        logger.info(
            "Corpus: %d training paragraphs (%d words), %d held-out (%d words)",
            len(train),
            sum(len(p.split()) for p in train),
            len(heldout),
            sum(len(p.split()) for p in heldout),
        )

    def make_data(self) -> None:
        for split, path in self.corpus.items():
            binarized_data.main(
                [
                    "--file_path",
                    str(path),
                    "--split",
                    split,
                    "--field_name",
                    "text",
                    "--tokenizer_type",
                    self.recipe.tokenizer_type,
                    "--tokenizer_name",
                    str(self.recipe.source),
                    "--dump_file",
                    str(self.out / "data" / "binarized_text"),
                    "--fast_process",
                    "--cache_dir",
                    str(self.out / "data" / "cache"),
                    "--seed",
                    str(self.s.seed),
                ]
            )
        token_counts.main(
            [
                "--data_file",
                str(self.data["train"]),
                "--token_counts_dump",
                str(self.counts),
                "--vocab_size",
                str(self.recipe.vocab_size()),
            ]
        )

    def steps(self, key: RunKey) -> int:
        return max(1, round(key.multiple * self.s.steps))

    def train(self, key: RunKey, resume: bool) -> None:
        s, run = self.s, self.run_dir(key)
        steps = self.steps(key)
        resume = resume and any((run / "checkpoints").glob("state_*"))
        argv = [
            "--resume" if resume else "--force",
            "--n_gpu",
            "0",
            "--seed",
            str(key.seed),
            *self.recipe.train_flags(key.variant, key.mapping),
            "--temperature",
            str(s.temperature),
            "--data_file",
            str(self.data["train"]),
            "--token_counts",
            str(self.counts),
            "--dump_path",
            str(run.parent),
            "--run_name",
            run.name,
            "--batch_size",
            str(s.batch_size),
            "--gradient_accumulation_steps",
            "1",
            "--learning_rate",
            str(s.learning_rate),
            "--max_steps",
            str(steps),
            "--n_epoch",
            "1000",
            "--log_interval",
            str(max(1, steps // self.recipe.log_points)),
            "--checkpoint_interval",
            str(max(1, steps // 3)),
        ]
        status, self.child_peak_mb = run_training(argv)
        if status != 0 or not (run / "pytorch_model.bin").exists():
            raise UserError(
                f"training {key.path} stopped before the end (exit status {status}; its message is above); "
                "run the same command again to resume it"
            )

    def evaluate(self, key: RunKey) -> None:
        """One run's held-out scores, also as TensorBoard scalars of the run (the plot's bars)."""
        from torch.utils.tensorboard import SummaryWriter

        row = self.recipe.evaluate_run(self.run_dir(key))
        logger.info("%s: %s", key.path, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        with SummaryWriter(log_dir=str(self.run_dir(key) / "log" / "heldout")) as tb:
            for m in self.recipe.metrics:
                tb.add_scalar(f"heldout/{m.key}", row[m.key], self.steps(key))
        write_json(row, self.eval_file(key))

    def collect(self) -> None:
        """results.json: the reference models, every run, and the statistics over seeds."""
        reference = json.loads(self.reference.read_text())
        runs = {key.path: json.loads(self.eval_file(key).read_text()) for key in self.keys}
        metrics = self.recipe.metrics
        models = dict(reference["models"])
        for variant in (BASELINE, CAUSAL):  # the mean over seeds (with one seed: that run's scores)
            rows = [runs[RunKey(variant, seed).path] for seed in self.seeds]
            models[variant] = {
                k: float(np.mean([r[k] for r in rows])) if isinstance(v, float) else v for k, v in rows[0].items()
            }
        control = RunKey(self.recipe.control, self.seeds[0])
        if control in self.keys:
            models[self.recipe.control] = runs[control.path]
        paired = {
            m.key: paired_comparison(
                [runs[RunKey(BASELINE, s).path][m.key] for s in self.seeds],
                [runs[RunKey(CAUSAL, s).path][m.key] for s in self.seeds],
                m,
            )
            for m in metrics
        }
        corpus = self.corpus_stats()
        corpus["train"]["mean_trained_length"] = reference["mean_trained_length"]
        tokens = self.s.steps * self.s.batch_size * reference["mean_trained_length"]
        results: dict = {
            "settings": dataclasses.asdict(self.s),
            "teacher": self.recipe.name,
            "seeds": self.seeds,
            "data_multiples": self.multiples,
            "models": models,
            "unigram_baseline": reference["unigram_baseline"],
            "interchange": reference["interchange"],
            "runs": runs,
            "paired": paired,
            "corpus": corpus,
            "timings_s": self.timings,
            "peak_rss_mb": self.peak_rss_mb,
            "teacher_check": teacher_check(
                models,
                reference["unigram_baseline"],
                next(m for m in metrics if m.key == self.recipe.accuracy_metric),
                self.recipe.control,
            ),
        }
        if len(self.multiples) > 1:
            results["data_efficiency"] = {
                "seeds": self.extra_seeds,
                "training_tokens": {f"{m:g}": m * tokens for m in self.multiples},
                "metrics": {m.key: data_efficiency(runs, self.extra_seeds, self.multiples, m) for m in metrics},
            }
        if self.mappings:
            results["mappings"] = self.compare_mappings(runs)
        write_json(results, self.results)

    def compare_mappings(self, runs: dict) -> dict:
        """Each other mapping's DIITO against the default mapping's and against plain distillation, seed by seed."""
        r, seeds = self.recipe, self.extra_seeds
        default = r.default_mapping

        def against(name: str, key: RunKey, label: str) -> dict:
            """`name`'s DIITO against the run `key` (of the first seed; the same variant for every seed)."""
            return {
                m.key: paired_comparison(
                    [runs[dataclasses.replace(key, seed=s).path][m.key] for s in seeds],
                    [runs[RunKey(CAUSAL, s, mapping=name).path][m.key] for s in seeds],
                    m,
                    (label, name),
                )
                for m in r.metrics
            }

        return {
            "seeds": seeds,
            "default": default,
            "descriptions": r.mappings,
            "vs_default": {name: against(name, RunKey(CAUSAL, seeds[0]), default) for name in self.mappings},
            "vs_plain": {name: against(name, RunKey(BASELINE, seeds[0]), BASELINE) for name in self.mappings},
        }

    def corpus_stats(self) -> dict:
        stats = {}
        for split, path in self.data.items():
            lengths = np.diff(load_sequences(path).offsets)
            stats[split] = {"sequences": int(len(lengths)), "tokens": int(lengths.sum())}
        return stats

    def report(self) -> None:
        report.write_report(
            json.loads(self.results.read_text()),
            self.recipe,
            [self.run_dir(RunKey(v, self.seeds[0])) for v in (BASELINE, CAUSAL)],
            self.plot,
            self.seeds_plot,
            self.data_plot,
            self.summary,
        )
