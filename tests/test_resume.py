"""Resumable training: a run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one,
a SIGKILL during a checkpoint write keeps the previous state, a non-finite loss stops or is skipped.

Runs that receive signals are subprocesses started through `LAUNCHER`, which runs
`causal_train.py` exactly as `python causal_train.py ...` does, plus test-only hooks chosen by
environment variables (nothing in the training code knows about tests).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import causal_train
from causal_distiller import CausalDistiller, saved_steps
from conftest import BERT_PICKLE, REPO
from test_training import train_args
from utils import UserError

TIMEOUT = 300  # seconds, for any one subprocess (they take a few seconds on an idle machine)

LAUNCHER = r'''
"""`python causal_train.py ARGS` with test hooks: python launcher.py REPO ARGS."""
import io, json, os, runpy, sys, time
from pathlib import Path

repo = sys.argv.pop(1)
sys.path.insert(0, repo)
import torch
import causal_distiller as cd
import counterfactual_utils as cf

env, rank = os.environ.get, int(os.environ.get("RANK", "0"))

if env("TEST_RECORD"):  # per rank: dual pairing, loaded batches per epoch, variables per step, final student
    out = Path(env("TEST_RECORD"))
    log = open(out / f"rank{rank}.jsonl", "a")
    record = lambda **kw: (log.write(json.dumps(kw) + "\n"), log.flush())
    iter_batches, sample, train = cd._SkipBatches.__iter__, cf.sample_interchange_variables, cd.CausalDistiller.train

    def recording_iter(self):
        for batch in iter_batches(self):
            record(epoch=self.batch_sampler.sampler.epoch, batch=batch)
            yield batch

    def recording_sample(mapping, rng):
        variables = sample(mapping, rng)
        record(variables=variables)
        return variables

    def recording_train(self):
        record(dual_index=self.dataset.dual_index.tolist(), torch_seed=torch.initial_seed())
        try:
            return train(self)
        finally:
            torch.save(self.student.state_dict(), out / f"student_rank{rank}.pt")

    cd._SkipBatches.__iter__, cf.sample_interchange_variables = recording_iter, recording_sample
    cd.CausalDistiller.train = recording_train

if env("TEST_PAUSE_AFTER"):  # after micro-batch N (on rank TEST_PAUSE_RANK or all): write the pid into
    step = cd.CausalDistiller._train_micro_batch  # TEST_MARKER and wait until a stop signal came

    def pausing_step(self, batch):
        step(self, batch)
        if self.state.n_total_iter == int(env("TEST_PAUSE_AFTER")) and int(env("TEST_PAUSE_RANK", rank)) == rank:
            Path(env("TEST_MARKER") + ".tmp").write_text(str(os.getpid()))
            os.replace(env("TEST_MARKER") + ".tmp", env("TEST_MARKER"))
            deadline = time.time() + 60
            while self._stop_requested is None and time.time() < deadline:
                time.sleep(0.01)

    cd.CausalDistiller._train_micro_batch = pausing_step

if env("TEST_HANG_IN_SAVE"):  # the N-th state write stops halfway: touch TEST_MARKER and hang
    save, state_writes = torch.save, []

    def hanging_save(obj, f, *args, **kwargs):
        if "/.state_" in str(getattr(f, "name", f)):
            state_writes.append(f)
            if len(state_writes) == int(env("TEST_HANG_IN_SAVE")):
                buf = io.BytesIO()
                save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: buf.tell() // 2])
                f.flush()
                Path(env("TEST_MARKER")).touch()
                time.sleep(600)
        return save(obj, f, *args, **kwargs)

    torch.save = hanging_save

sys.argv = [os.path.join(repo, "causal_train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """50 short sequences (12-39 tokens) of the real binarized sample, in its format: quick epochs."""
    if not BERT_PICKLE.is_file():
        pytest.skip(f"real data not found at {BERT_PICKLE}")
    with open(BERT_PICKLE, "rb") as f:
        seqs = pickle.load(f)
    short = [s for s in seqs if 12 <= len(s) <= 40 and (s == 100).mean() < 0.5][:50]
    path = tmp_path_factory.mktemp("corpus") / "small.train.bert-base-uncased.pickle"
    with open(path, "wb") as f:
        pickle.dump(short, f)
    return path


@pytest.fixture
def launcher(tmp_path) -> Path:
    path = tmp_path / "launcher.py"
    path.write_text(LAUNCHER)
    return path


@contextmanager
def processes():
    """Collects started subprocesses; kills those still running, with their children, when the block ends."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by `launch` and everything it started (torchrun's workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)


def launch(started: list, launcher: Path, args: list[str], log: Path, prefix: tuple[str, ...] = (sys.executable,),
           **hooks) -> subprocess.Popen:
    """Start `prefix launcher REPO args` with hooks as TEST_* variables, output into `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **{f"TEST_{k.upper()}": str(v) for k, v in hooks.items()})
    with open(log, "w") as out:
        proc = subprocess.Popen([*prefix, str(launcher), str(REPO), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO, start_new_session=True)
    started.append(proc)
    return proc


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"timed out after {TIMEOUT}s:\n{log.read_text()[-3000:]}")


def wait_for(marker: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{marker.name} never appeared (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def states(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("state_*"))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def scalars(run: Path, tag: str) -> dict[int, float]:
    """TensorBoard scalar `tag` of a run folder, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "log" / "train"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


# 50 sequences, batch 4: 13 micro-batches per epoch; accumulation 3: the epoch's last window has one.
RESUME_FLAGS = ("--n_epoch", "2", "--max_steps", "-1", "--gradient_accumulation_steps", "3",
                "--checkpoint_interval", "5", "--save_total_limit", "2")


def test_sigterm_mid_accumulation_then_resume_is_bitwise_equal_to_an_uninterrupted_run(
    small_corpus, launcher, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    def args(folder: str, *extra: str) -> list[str]:
        # The student config has dropout 0.1, so the restored RNG streams matter.
        return train_args(tmp_path / folder, tiny_bert_teacher, tiny_student_config, tiny_mapping,
                          "--data_file", str(small_corpus), *RESUME_FLAGS, *extra)

    marker = tmp_path / "paused"
    with processes() as started:
        reference = launch(started, launcher, args("reference"), tmp_path / "reference.log")
        cut = launch(started, launcher, args("cut"), tmp_path / "cut.log", pause_after=6, marker=marker)
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

        resumed = launch(started, launcher, args("cut", "--resume"), tmp_path / "resumed.log")
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


def test_sigkill_while_writing_a_state_keeps_the_previous_one_for_resume(
    small_corpus, launcher, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    args = train_args(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, "--data_file",
                      str(small_corpus), "--checkpoint_interval", "3", "--gradient_accumulation_steps", "2")
    marker, log = tmp_path / "writing", tmp_path / "killed.log"
    with processes() as started:
        proc = launch(started, launcher, args, log, hang_in_save=2, marker=marker)
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
        causal_train.main(args + ["--resume", "--batch_size", "8"])
    assert json.loads((folder.parent / "parameters.json").read_text())["batch_size"] == 4  # left as it was
    dump = causal_train.main(args + ["--resume"])
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


def test_nonfinite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    small_corpus, monkeypatch, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    poison_loss_at(monkeypatch, 5)
    args = train_args(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, "--data_file",
                      str(small_corpus), "--max_steps", "-1")
    with pytest.raises(UserError, match="non-finite loss at micro-batch 5 .*--skip_nonfinite_loss"):
        causal_train.main(args)
    run = tmp_path / "results" / "run"
    assert states(run) == ["state_0000000004_rank0.pth"]
    student = load(run / "checkpoints" / "state_0000000004_rank0.pth")["student"]
    assert all(torch.isfinite(v).all() for v in student.values())
    assert not (run / "pytorch_model.bin").exists()


def test_skip_nonfinite_loss_skips_that_optimizer_step_and_counts_it(
    small_corpus, monkeypatch, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    poison_loss_at(monkeypatch, 3)  # accumulation 2: the window of micro-batches 3-4 is dropped
    args = train_args(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, "--data_file",
                      str(small_corpus), "--skip_nonfinite_loss", "--save_total_limit", "3")
    dump = causal_train.main(args)  # --max_steps 3
    step = {n: load(dump / "checkpoints" / f"state_{n:010d}_rank0.pth") for n in (2, 4, 6)}
    assert step[6]["state"]["n_skipped_steps"] == 1 and step[6]["state"]["n_optim_steps"] == 3
    for name, value in step[4]["student"].items():  # the skipped step left the weights alone
        assert torch.equal(value, step[2]["student"][name]), name
    assert not torch.equal(step[6]["student"]["vocab_projector.bias"], step[4]["student"]["vocab_projector.bias"])
    skipped = scalars(dump, "global/skipped_steps")
    assert skipped[2] == 0 and skipped[4] == 1 and skipped[6] == 1
