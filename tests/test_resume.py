"""Resumable training: a run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one,
a SIGKILL during a checkpoint write keeps the previous state, a non-finite loss stops or is skipped;
the resume rules (damaged and tampered states, changed corpus, learning rate and step count).

Runs that receive signals are subprocesses started through `tests/hooked_train.py`, which runs
`causal_train.py` exactly as `python causal_train.py ...` does, plus test-only hooks chosen by
environment variables (nothing in the training code knows about tests).
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import load_state as load
from conftest import resume_argv, train_argv
from conftest import tensorboard_scalars as scalars
from launch import finish, kill_group, launch, processes, wait_for

import causal_train
from causal_distiller import CausalDistiller
from checkpointing import UnreadableState, load_state_file, saved_steps
from utils import UserError


def states(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("state_*"))


# 50 sequences, batch 4: 13 micro-batches per epoch; accumulation 3: the epoch's last window has one.
RESUME_FLAGS = (
    "--n_epoch",
    "2",
    "--max_steps",
    "-1",
    "--gradient_accumulation_steps",
    "3",
    "--checkpoint_interval",
    "5",
    "--save_total_limit",
    "2",
)


def test_sigterm_mid_accumulation_then_resume_is_bitwise_equal_to_an_uninterrupted_run(
    small_corpus, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    def args(folder: str, *extra: str) -> list[str]:
        # The student config has dropout 0.1, so the restored RNG streams matter.
        return train_argv(
            tmp_path / folder,
            tiny_bert_teacher,
            tiny_student_config,
            tiny_mapping,
            *RESUME_FLAGS,
            *extra,
            data_file=small_corpus,
        )

    marker = tmp_path / "paused"
    with processes() as started:
        reference = launch(started, args("reference"), tmp_path / "reference.log")
        cut = launch(started, args("cut"), tmp_path / "cut.log", pause_after=6, marker=marker)
        wait_for(marker, cut, tmp_path / "cut.log")
        cut.send_signal(signal.SIGTERM)
        # The stop is agreed at the next micro-batch (7): mid-window, so partial gradients are saved.
        assert finish(cut, tmp_path / "cut.log") == 128 + signal.SIGTERM, (tmp_path / "cut.log").read_text()[-3000:]
        run = tmp_path / "cut" / "results" / "run"
        assert states(run) == ["state_0000000005_rank0.pth", "state_0000000007_rank0.pth"]
        saved = load(run / "checkpoints" / "state_0000000007_rank0.pth")
        assert saved["state"]["epoch"] == 0 and saved["state"]["batch_in_epoch"] == 7
        assert saved["grads"] is not None and any(g is not None for g in saved["grads"])
        assert not (run / "pytorch_model.bin").exists()

        resumed = launch(started, resume_argv(args("cut")), tmp_path / "resumed.log")
        assert finish(resumed, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        assert finish(reference, tmp_path / "reference.log") == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert "Resumed from" in (tmp_path / "resumed.log").read_text()
    assert states(run) == ["state_0000000020_rank0.pth", "state_0000000025_rank0.pth"]
    expected = torch.load(tmp_path / "reference" / "results" / "run" / "pytorch_model.bin", weights_only=True)
    got = torch.load(run / "pytorch_model.bin", weights_only=True)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different
    # Same optimizer trajectory: the resumed run's step counters match a whole run's.
    final = load(run / "checkpoints" / "state_0000000025_rank0.pth")["state"]
    assert (final["epoch"], final["n_optim_steps"]) == (1, 9)


def test_sigkill_while_writing_a_state_keeps_the_previous_one_for_resume(tmp_path, small_run_argv):
    args = small_run_argv("--checkpoint_interval", "3", "--gradient_accumulation_steps", "2")
    marker, log = tmp_path / "writing", tmp_path / "killed.log"
    with processes() as started:
        proc = launch(started, args, log, hang_in_save=2, marker=marker)
        wait_for(marker, proc, log)
        kill_group(proc)
    folder = tmp_path / "results" / "run" / "checkpoints"
    partial = list(folder.glob(".state_0000000006_rank0.pth.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(UnreadableState):
        load_state_file(partial[0], 0)
    assert saved_steps(folder, 0) == [3]
    previous = load(folder / "state_0000000003_rank0.pth")
    assert previous["state"]["n_total_iter"] == 3 and "student" in previous and "optimizer" in previous
    assert set(torch.load(folder.parent / "checkpoint.pth", weights_only=True)) == set(previous["student"])

    with pytest.raises(UserError, match="batch_size=4 \\(this run: 8\\)"):
        causal_train.main(resume_argv(args, "--batch_size", "8"))
    assert json.loads((folder.parent / "parameters.json").read_text())["batch_size"] == 4  # left as it was
    dump = causal_train.main(resume_argv(args))
    assert (dump / "pytorch_model.bin").is_file()
    assert states(dump) == ["state_0000000006_rank0.pth"]
    assert not list(folder.glob(".state_*.tmp"))  # the next complete write removed the partial one


def poison_loss_at(monkeypatch, micro_batch: int | None) -> None:
    """Make the loss of the given micro-batch (1-based; None: of every one) NaN."""
    loss_step = CausalDistiller._loss_step

    def poisoned(self, batch):
        loss, metrics = loss_step(self, batch)
        hit = micro_batch is None or self.state.n_total_iter + 1 == micro_batch
        return (loss * float("nan") if hit else loss), metrics

    monkeypatch.setattr(CausalDistiller, "_loss_step", poisoned)


def test_nonfinite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, small_run_argv):
    poison_loss_at(monkeypatch, 5)
    args = small_run_argv("--max_steps", "-1")
    with pytest.raises(UserError, match="non-finite loss at micro-batch 5 .*--skip_nonfinite_loss"):
        causal_train.main(args)
    run = tmp_path / "results" / "run"
    assert states(run) == ["state_0000000004_rank0.pth"]
    student = load(run / "checkpoints" / "state_0000000004_rank0.pth")["student"]
    assert all(torch.isfinite(v).all() for v in student.values())
    assert not (run / "pytorch_model.bin").exists()


def test_skip_nonfinite_loss_skips_that_optimizer_step_and_counts_it(monkeypatch, small_run_argv):
    poison_loss_at(monkeypatch, 3)  # accumulation 2: the window of micro-batches 3-4 is dropped
    args = small_run_argv("--skip_nonfinite_loss", "--save_total_limit", "3")
    dump = causal_train.main(args)  # --max_steps 3
    step = {n: load(dump / "checkpoints" / f"state_{n:010d}_rank0.pth") for n in (2, 4, 6)}
    assert step[6]["state"]["n_skipped_steps"] == 1 and step[6]["state"]["n_optim_steps"] == 3
    for name, value in step[4]["student"].items():  # the skipped step left the weights alone
        assert torch.equal(value, step[2]["student"][name]), name
    assert not torch.equal(step[6]["student"]["vocab_projector.bias"], step[4]["student"]["vocab_projector.bias"])
    skipped = scalars(dump, "global/skipped_steps")
    assert skipped[2] == 0 and skipped[4] == 1 and skipped[6] == 1


# --- resume rules ---------------------------------------------------------------------------------------
# One finished run (3 optimizer steps of 2 micro-batches, states at micro-batches 2, 4, 6) is copied
# into each test's folder, which then damages, replaces or resumes it.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_teacher, tiny_student_config, tiny_mapping, small_corpus):
    root = tmp_path_factory.mktemp("finished")
    causal_train.main(
        train_argv(
            root,
            tiny_bert_teacher,
            tiny_student_config,
            tiny_mapping,
            "--save_total_limit",
            "3",
            data_file=small_corpus,
        )
    )
    return root / "results"


@pytest.fixture
def copied_run(finished_run, tmp_path, small_run_argv):
    """(argv of the finished run, its run folder), copied to this test's tmp_path without its
    train_results.json: the tests resume from its states as from a run that had not finished (a
    finished run is only reported; tests/test_faults_models.py)."""
    import shutil

    shutil.copytree(finished_run, tmp_path / "results")
    (tmp_path / "results" / "run" / "train_results.json").unlink()
    return small_run_argv("--save_total_limit", "3"), tmp_path / "results" / "run"


class Payload:
    """Pickles as a call that creates a file: what a tampered state would run if it were unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_tampered_state_is_refused_and_its_code_never_runs(copied_run, tmp_path):
    argv, run = copied_run
    newest, marker = run / "checkpoints" / "state_0000000006_rank0.pth", tmp_path / "payload_ran"
    torch.save({**load(newest), "state": Payload(marker)}, newest)
    with pytest.raises(UserError, match=r"refused .*state_0000000006_rank0\.pth: it holds objects"):
        causal_train.main(resume_argv(argv))
    assert not marker.exists()


def test_a_file_that_is_not_a_training_state_is_refused(copied_run):
    argv, run = copied_run
    torch.save({"weight": torch.ones(3)}, run / "checkpoints" / "state_0000000006_rank0.pth")
    with pytest.raises(UserError, match=r"state_0000000006_rank0\.pth: it is not a rank-0 training state"):
        causal_train.main(resume_argv(argv))


def test_a_truncated_newest_state_falls_back_to_the_previous_one_with_a_warning(copied_run, finished_run, caplog):
    argv, run = copied_run
    newest = run / "checkpoints" / "state_0000000006_rank0.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (run / "pytorch_model.bin").unlink()
    causal_train.main(resume_argv(argv))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot read" in w and "state_0000000006_rank0.pth" in w for w in warnings), warnings
    assert any("resuming from micro-batch 4" in w for w in warnings), warnings
    # Steps 3 done again from the state of micro-batch 4: the run ends where it had ended.
    expected = torch.load(finished_run / "run" / "pytorch_model.bin", weights_only=True)
    got = torch.load(run / "pytorch_model.bin", weights_only=True)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def test_a_state_saved_before_optimizer_groups_were_named_resumes_bitwise_equal(copied_run, finished_run):
    argv, run = copied_run
    (run / "checkpoints" / "state_0000000006_rank0.pth").unlink()  # resume from micro-batch 4: step 3 left
    (run / "pytorch_model.bin").unlink()
    path = run / "checkpoints" / "state_0000000004_rank0.pth"
    state = load(path)
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["decay", "no_decay"]
    for group in state["optimizer"]["param_groups"]:
        del group["name"]  # as the code before named groups wrote them: decay, then no_decay
    torch.save(state, path)
    causal_train.main(resume_argv(argv))
    expected = torch.load(finished_run / "run" / "pytorch_model.bin", weights_only=True)
    got = torch.load(run / "pytorch_model.bin", weights_only=True)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    resaved = load(run / "checkpoints" / "state_0000000006_rank0.pth")["optimizer"]["param_groups"]
    assert [g["name"] for g in resaved] == ["decay", "no_decay"]


def test_a_state_whose_optimizer_groups_do_not_match_is_refused(copied_run):
    argv, run = copied_run
    path = run / "checkpoints" / "state_0000000006_rank0.pth"
    state = load(path)
    state["optimizer"]["param_groups"][1]["name"] = "embeddings"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"parameter groups \['decay', 'embeddings'\], this run's has"):
        causal_train.main(resume_argv(argv))
    state["optimizer"]["param_groups"].reverse()  # named groups are matched by name, not by position
    state["optimizer"]["param_groups"][0]["name"] = "no_decay"
    state["optimizer"]["param_groups"][1]["params"] = state["optimizer"]["param_groups"][1]["params"][:-1]
    torch.save(state, path)
    with pytest.raises(UserError, match=r"parameter group 'decay' holds \d+ parameters, this run's \d+"):
        causal_train.main(resume_argv(argv))


def test_a_new_learning_rate_on_resume_applies_from_the_resumed_step(copied_run):
    argv, run = copied_run
    (run / "checkpoints" / "state_0000000006_rank0.pth").unlink()  # resume from micro-batch 4: step 3 left
    causal_train.main(resume_argv(argv, "--learning_rate", "1e-3"))
    # 3 steps, 1 of warm-up: step 3 runs at peak * (3 - 2) / (3 - 1), with the new peak.
    assert scalars(run, "learning_rate/lr")[5] == pytest.approx(1e-3 * 0.5)
    saved = load(run / "checkpoints" / "state_0000000006_rank0.pth")
    assert saved["scheduler"]["base_lrs"] == [1e-3, 1e-3]
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [0.0, 0.0]  # the schedule's end
    assert json.loads((run / "parameters.json").read_text())["learning_rate"] == 1e-3


def test_a_finished_run_extended_with_more_steps_continues_on_the_schedule_for_the_new_total(copied_run):
    argv, run = copied_run
    causal_train.main(resume_argv(argv, "--max_steps", "5"))
    lr = scalars(run, "learning_rate/lr")
    # 5 steps, 1 of warm-up, peak 5e-4: step 4 at (5 - 3) / 4 of the peak, step 5 at 1 / 4 (the old
    # schedule had ended at 0).
    assert lr[7] == pytest.approx(5e-4 * 2 / 4) and lr[8] == pytest.approx(5e-4 * 1 / 4)
    before, after = (load(run / "checkpoints" / f"state_{n:010d}_rank0.pth") for n in (6, 10))
    assert after["state"]["n_optim_steps"] == 5
    assert not torch.equal(before["student"]["vocab_projector.bias"], after["student"]["vocab_projector.bias"])


def test_resume_on_another_corpus_with_as_many_sequences_is_refused(copied_run, small_corpus, tmp_path):
    import pickle

    import numpy as np

    argv, run = copied_run
    rng = np.random.default_rng(0)
    # Same sequences count and lengths, same framing; the words inside are shuffled.
    other = [np.concatenate([s[:1], rng.permutation(s[1:-1]), s[-1:]]) for s in pickle.loads(small_corpus.read_bytes())]
    other_path = tmp_path / "other.train.bert-base-uncased.pickle"
    other_path.write_bytes(pickle.dumps(other))
    with pytest.raises(UserError, match="saved on another corpus"):
        causal_train.main(resume_argv(argv, "--data_file", str(other_path)))


def test_skipping_most_steps_warns_on_the_console_and_sums_up_at_the_end(monkeypatch, small_run_argv, caplog):
    poison_loss_at(monkeypatch, None)
    causal_train.main(
        small_run_argv(
            "--skip_nonfinite_loss",
            "--gradient_accumulation_steps",
            "1",
            "--max_steps",
            "10",
            "--checkpoint_interval",
            "100",
        )
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("10 of the 10 optimizer steps so far were skipped" in w for w in warnings), warnings
    assert "10 of 10 optimizer steps were skipped for a non-finite loss or gradient" in warnings
