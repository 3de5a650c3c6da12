"""scripts/plot_runs.py on two small runs whose TensorBoard events are written here with SummaryWriter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from scripts import plot_runs
from utils import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["plain", "DIITO"]

# run -> event folder (relative) -> tag -> [(step, value)]; values are exact in float32
RUNS = {
    "run_a": {
        "log": {
            "losses/loss": [(s, 4.0 - s / 4) for s in range(10)],
            "losses/loss_causal_ce": [(s, 2.0 - s / 8) for s in range(10)],
            "learning_rate/lr": [(s, 5e-4 * (1 - s / 10)) for s in range(10)],
            "global/speed": [(s, 100.0 + s) for s in range(10)],  # not a default panel
        },
        "log/heldout": {"heldout/mlm_accuracy": [(10, 0.25)], "heldout/mlm_loss": [(10, 6.5)]},
    },
    "run_b": {
        "log": {
            "losses/loss": [(s, 3.5 - s / 8) for s in range(0, 12, 2)],
            "learning_rate/lr": [(s, 5e-4) for s in range(0, 12, 2)],
        },
        "log/heldout": {"heldout/mlm_accuracy": [(12, 0.375)], "heldout/mlm_loss": [(6, 7.0), (12, 6.0)]},
    },
}


def write_events(folder: Path, scalars: dict[str, list[tuple[int, float]]], walltime0: float = 1000.0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step, walltime=walltime0 + step)
    writer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("plot_runs")
    for run, folders in RUNS.items():
        for sub, scalars in folders.items():
            write_events(root / run / sub, scalars)
    return [root / run for run in RUNS]


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures `plot` draws, kept when it closes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, close = [], plt.close

    def keep_and_close(fig=None):
        kept.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep_and_close)
    return kept


def expected(run: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    points = {t: p for scalars in RUNS[run].values() for t, p in scalars.items()}[tag]
    return (np.array([s for s, _ in points]), np.array([v for _, v in points], dtype=np.float32).astype(np.float64))


def test_read_scalars_returns_what_was_written_from_every_event_folder(runs):
    for run in runs:
        series = plot_runs.read_scalars(run)
        written = {t for scalars in RUNS[run.name].values() for t in scalars}
        assert set(series) == written  # the log/heldout folder joins the training folder
        for tag, s in series.items():
            steps, values = expected(run.name, tag)
            assert s.steps.dtype == np.int64 and s.values.dtype == np.float64
            np.testing.assert_array_equal(s.steps, steps, err_msg=tag)
            np.testing.assert_array_equal(s.values, values, err_msg=tag)


def test_a_step_logged_twice_keeps_the_latest_write(tmp_path):
    """A resumed run repeats steps: the later wall time wins, whatever folder order says."""
    write_events(tmp_path / "run" / "z_first", {"losses/loss": [(s, 1.0) for s in range(8)]}, walltime0=1000.0)
    write_events(tmp_path / "run" / "a_resumed", {"losses/loss": [(s, 2.0) for s in range(5, 10)]}, walltime0=2000.0)
    s = plot_runs.read_scalars(tmp_path / "run")["losses/loss"]
    np.testing.assert_array_equal(s.steps, np.arange(10))
    np.testing.assert_array_equal(s.values, [1.0] * 5 + [2.0] * 5)


def test_main_writes_a_png_with_a_panel_per_logged_tag(runs, tmp_path, figures):
    import matplotlib.pyplot as plt

    output = tmp_path / "plots" / "runs.png"
    assert plot_runs.main([*map(str, runs), "--labels", *LABELS, "--output", str(output)]) == output
    data = output.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    height, width, _ = plt.imread(output).shape
    assert height > 100 and width > 100
    assert [p.name for p in output.parent.iterdir()] == ["runs.png"]  # no temporary file left over

    (fig,) = figures
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    # Default tags in their order, then heldout/* ones; global/speed is not a default panel.
    assert list(axes) == [
        "total loss",
        "causal loss (causal_ce)",
        "learning rate",
        "held-out MLM loss",
        "held-out MLM accuracy",
    ]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == LABELS

    # Curves: one line per run that logged the tag, with the logged points.
    for title, tag, logged_by in [
        ("total loss", "losses/loss", ["run_a", "run_b"]),
        ("causal loss (causal_ce)", "losses/loss_causal_ce", ["run_a"]),  # one run only
        ("learning rate", "learning_rate/lr", ["run_a", "run_b"]),
    ]:
        lines = axes[title].get_lines()
        assert [line.get_label() for line in lines] == [LABELS[list(RUNS).index(r)] for r in logged_by], title
        for line, run in zip(lines, logged_by, strict=False):
            steps, values = expected(run, tag)
            np.testing.assert_array_equal(line.get_xdata(), steps)
            np.testing.assert_array_equal(line.get_ydata(), values)
    # The causal loss keeps run_a's colour although run_b did not log it.
    assert axes["causal loss (causal_ce)"].get_lines()[0].get_color() == axes["total loss"].get_lines()[0].get_color()

    # Logged once by every run: bars, one per run, with the values written on them.
    accuracy = axes["held-out MLM accuracy"]
    assert not accuracy.get_lines()
    assert [p.get_height() for p in accuracy.patches] == [0.25, 0.375]
    assert [t.get_text() for t in accuracy.texts] == ["0.25", "0.375"]
    assert [t.get_text() for t in accuracy.get_xticklabels()] == LABELS

    # Logged once by one run and twice by the other: lines, and the single point stays visible.
    loss = axes["held-out MLM loss"]
    assert not loss.patches
    single, several = loss.get_lines()
    assert list(single.get_ydata()) == [6.5] and single.get_marker() not in (None, "None", "", " ")
    assert list(several.get_ydata()) == [7.0, 6.0]


def test_tags_smoothing_and_default_labels(runs, tmp_path, figures):
    output = tmp_path / "lr.png"
    plot_runs.main(
        [
            *map(str, runs),
            "--tags",
            "losses/loss",
            "learning_rate/lr",
            "global/speed",
            "--smoothing",
            "0.5",
            "--output",
            str(output),
            "--ncols",
            "2",
        ]
    )
    assert output.read_bytes()[:8] == PNG_MAGIC
    (fig,) = figures
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["total loss", "learning rate", "global/speed"]
    assert len(fig.axes) == 4  # 2 x 2 grid, the last panel hidden
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run_a", "run_b"]  # folder names
    loss, lr = visible[0], visible[1]
    # Smoothed: a faint raw line and the moving average per run; the schedule is never smoothed.
    raw, smoothed = loss.get_lines()[:2]
    steps, values = expected("run_a", "losses/loss")
    np.testing.assert_array_equal(raw.get_ydata(), values)
    np.testing.assert_allclose(smoothed.get_ydata(), plot_runs.smooth(values, 0.5))
    assert not np.allclose(smoothed.get_ydata(), values)
    assert len(lr.get_lines()) == 2


def test_smooth_is_a_debiased_moving_average():
    values = np.array([4.0, 2.0, 0.0])
    np.testing.assert_allclose(plot_runs.smooth(values, 0.5), [4.0, (1.0 + 1.0) / 0.75, (0.5 + 0.5 + 0) / 0.875])
    np.testing.assert_array_equal(plot_runs.smooth(values, 0.0), values)


def test_a_requested_tag_no_run_logged_is_refused(runs, tmp_path):
    with pytest.raises(UserError, match="no run logged 'losses/loss_mlm'"):
        plot_runs.main([*map(str, runs), "--tags", "losses/loss_mlm", "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{a}", "{b}", "--labels", "only_one"], "1 --labels for 2 runs"),
        (["{a}", "{empty}"], "no TensorBoard event files under"),
        (["{a}", "{missing}"], "run folder not found"),
        (["{a}", "--smoothing", "1"], "--smoothing must be in [0, 1)"),
    ],
)
def test_cli_errors_exit_2_with_one_error_line(runs, tmp_path, args, message):
    (tmp_path / "empty" / "log").mkdir(parents=True)
    (tmp_path / "empty" / "log" / "notes.txt").write_text("no events here")
    names = dict(a=runs[0], b=runs[1], empty=tmp_path / "empty", missing=tmp_path / "missing")
    output = tmp_path / "out.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "plot_runs.py"),
            *[a.format(**names) for a in args],
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert not output.exists()
