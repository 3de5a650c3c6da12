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

import causal_train
from causal_distiller import CausalDistiller
from checkpointing import saved_steps
from conftest import load_state as load
from conftest import resume_argv, train_argv
from conftest import tensorboard_scalars as scalars
from launch import finish, kill_group, launch, processes, wait_for
from utils import UserError


def states(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("state_*"))


# 50 sequences, batch 4: 13 micro-batches per epoch; accumulation 3: the epoch's last window has one.
RESUME_FLAGS = ("--n_epoch", "2", "--max_steps", "-1", "--gradient_accumulation_steps", "3",
                "--checkpoint_interval", "5", "--save_total_limit", "2")


def test_sigterm_mid_accumulation_then_resume_is_bitwise_equal_to_an_uninterrupted_run(
    small_corpus, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    def args(folder: str, *extra: str) -> list[str]:
        # The student config has dropout 0.1, so the restored RNG streams matter.
        return train_argv(tmp_path / folder, tiny_bert_teacher, tiny_student_config, tiny_mapping,
                          *RESUME_FLAGS, *extra, data_file=small_corpus)

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
    with pytest.raises(Exception):
        load(partial[0])
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


def poison_loss_at(monkeypatch, micro_batch: int) -> None:
    """Make the loss of the given micro-batch (1-based) NaN."""
    loss_step = CausalDistiller._loss_step

    def poisoned(self, batch):
        loss, metrics = loss_step(self, batch)
        return (loss * float("nan") if self.state.n_total_iter + 1 == micro_batch else loss), metrics

    monkeypatch.setattr(CausalDistiller, "_loss_step", poisoned)


def test_nonfinite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path,
                                                                                small_run_argv):
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
