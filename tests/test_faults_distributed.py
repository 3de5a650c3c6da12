"""A rank that dies or stalls under `torchrun` (2 gloo processes, tiny models): the other rank ends
with one `error:` line naming it, the saved states are kept, and `--resume` finishes the run.

The message itself (`rank_faults`) is also checked in-process, for more ranks than two.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch.distributed as dist
from conftest import resume_argv
from launch import TORCHRUN, finish, launch, processes, wait_for

import rank_faults
from training_config import RunContext
from utils import AbortRun, UserError, run_cli

# 6 micro-batches (3 optimizer steps of 2), a state every 2; rank 1 stops after micro-batch 4.
PAUSE_AFTER = 4
# --ddp_timeout, seconds. It also bounds how late the second process may connect at start-up, which
# took over 5 s on a busy 2-core machine; the stall test waits it out once.
DDP_TIMEOUT = {"killed": 60, "stalled": 15}


def rank_lines(log, rank: int) -> list[str]:
    """The lines one worker printed (torchrun --tee prefixes them with [default<rank>]:)."""
    prefix = f"[default{rank}]:"
    return [line[len(prefix) :] for line in log.read_text().splitlines() if line.startswith(prefix)]


def one_error_line(log, rank: int) -> str:
    lines = rank_lines(log, rank)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, log.read_text()[-4000:]
    assert not [line for line in lines if "Traceback" in line], log.read_text()[-4000:]
    return errors[0]


def states(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_rank_that_dies_or_stalls_ends_the_other_with_one_line_and_resume_finishes(fault, small_run_argv, tmp_path):
    argv = small_run_argv("--ddp_timeout", str(DDP_TIMEOUT[fault]))
    run, marker = tmp_path / "results" / "run", tmp_path / "paused"
    log, resumed_log = tmp_path / "cut.log", tmp_path / "resumed.log"
    with processes() as started:
        cut = launch(started, argv, log, TORCHRUN, pause_after=PAUSE_AFTER, pause_rank=1, marker=marker)
        wait_for(marker, cut, log)
        paused_at = time.monotonic()
        if fault == "killed":
            os.kill(int(marker.read_text()), signal.SIGKILL)
        # A stalled rank 1 waits in the test hook until torchrun stops it after rank 0 has failed.
        assert finish(cut, log) != 0
        elapsed = time.monotonic() - paused_at

        error = one_error_line(log, 0)
        # torchrun's summary: rank 0 ended with the user-error status, not by the launcher's SIGTERM.
        assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\n\s*exitcode\s*:\s*2 ", log.read_text()), log.read_text()[
            -3000:
        ]
        assert "rank 0 lost contact with rank 1" in error and "--resume" in error, error
        if fault == "killed":
            assert "closed its connection" in error, error
            assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*-9", log.read_text()), log.read_text()[-3000:]
        else:
            assert f"did not answer within --ddp_timeout {DDP_TIMEOUT[fault]} s" in error, error
            assert elapsed >= DDP_TIMEOUT[fault] - 1
        # Both ranks' states of micro-batch 4 are kept, and nothing newer was written.
        assert states(run) == [f"state_{PAUSE_AFTER:010d}_rank{r}.pth" for r in (0, 1)]
        assert not (run / "pytorch_model.bin").exists()

        resumed = launch(started, resume_argv(argv), resumed_log, TORCHRUN)
        assert finish(resumed, resumed_log) == 0, resumed_log.read_text()[-3000:]
    assert f"micro-batch {PAUSE_AFTER} of the epoch" in resumed_log.read_text()
    assert (run / "pytorch_model.bin").is_file()


def context(rank: int, world_size: int) -> RunContext:
    return RunContext(global_rank=rank, world_size=world_size)


GLOO_RESET = RuntimeError(
    "[/w/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:50073: Connection reset by peer."
)
GLOO_TIMEOUT = RuntimeError(
    "[/w/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"
)


def test_only_errors_of_a_lost_peer_count_as_collective_failures():
    assert rank_faults.is_collective_failure(GLOO_RESET)
    assert rank_faults.is_collective_failure(GLOO_TIMEOUT)
    assert rank_faults.is_collective_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not rank_faults.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not rank_faults.is_collective_failure(ValueError("Connection reset by peer"))


def test_with_two_ranks_the_message_names_the_other_one_and_how_it_was_lost():
    reset = rank_faults.lost_rank_message(GLOO_RESET, context(1, 2), 1800)
    assert reset.startswith("rank 1 lost contact with rank 0, which closed its connection")
    stalled = rank_faults.lost_rank_message(GLOO_TIMEOUT, context(0, 2), 30)
    assert stalled.startswith("rank 0 lost contact with rank 1, which did not answer within --ddp_timeout 30 s")
    assert "--resume" in stalled and "\n" not in stalled


@pytest.fixture
def store_group(monkeypatch):
    """A one-process gloo group over an in-memory store, for the roll call of a larger world."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield store
    dist.destroy_process_group()


def test_with_more_ranks_the_roll_call_names_those_that_did_not_answer(store_group, monkeypatch):
    monkeypatch.setattr(rank_faults, "ROLL_CALL_SECONDS", 0.3)
    for survivor in (0, 3):  # they answered the roll call before rank 2 asks
        rank_faults.roll_call(context(survivor, 4), 0)
    message = rank_faults.lost_rank_message(GLOO_TIMEOUT, context(2, 4), 60)
    assert message.startswith("rank 2 lost contact with rank 1, which did not answer"), message


def test_when_every_rank_answers_the_link_is_blamed_not_a_rank(store_group, monkeypatch):
    for survivor in (0, 1, 3):
        rank_faults.roll_call(context(survivor, 4), 0)
    start = time.monotonic()
    message = rank_faults.lost_rank_message(GLOO_RESET, context(2, 4), 60)
    assert time.monotonic() - start < 1  # no wait once everyone answered
    assert message.startswith("rank 2 lost contact with another rank"), message


def test_a_gone_store_leaves_every_other_rank_named(monkeypatch):
    def no_store():
        raise RuntimeError("Default process group has not been initialized")

    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", no_store)
    message = rank_faults.lost_rank_message(GLOO_RESET, context(0, 3), 60)
    assert message.startswith("rank 0 lost contact with ranks 1, 2, which closed"), message


def test_a_process_group_that_cannot_form_is_one_user_error_naming_the_timeout(monkeypatch):
    import causal_train

    def refused(**kwargs):
        raise RuntimeError(
            "Gloo connectFullMesh failed with [/w/third_party/gloo/gloo/transport/tcp/pair.cc:152] timed out "
            "connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:9646"
        )

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", refused)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    required = ["--dump_path", "x", "--data_file", "x", "--student_type", "distilbert", "--student_config", "x"]
    required += ["--teacher_type", "bert", "--teacher_name", "x", "--n_gpu", "0"]
    _, options = causal_train.parse_args([*required, "--ddp_timeout", "5"])
    with pytest.raises(UserError) as refusal:
        causal_train.init_distributed(options)
    message = str(refusal.value)
    assert message.startswith("rank 1 could not connect to the other 1 process(es) within --ddp_timeout 5 s")
    assert "(Gloo connectFullMesh failed with timed out connecting: SO_ERROR: Connection refused" in message
    assert "pair.cc" not in message and "\n" not in message


def test_a_lost_rank_error_is_printed_on_one_line_and_ends_the_process_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the real one would end the test process

    def main():
        raise AbortRun("rank 0 lost contact with rank 1")

    with pytest.raises(SystemExit):
        run_cli(main)
    assert exits == [2]
    assert capsys.readouterr().err == "error: rank 0 lost contact with rank 1\n"


def test_a_collective_failure_outside_the_loop_is_one_user_error(monkeypatch, small_run_argv):
    """In-process: a failing collective during start-up reaches the CLI as a UserError naming the rank."""
    import causal_train

    monkeypatch.setattr(
        causal_train,
        "init_distributed",
        lambda options: RunContext(global_rank=0, world_size=2),
    )

    def failing_train(*args):
        raise GLOO_RESET

    monkeypatch.setattr(causal_train, "train", failing_train)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(AbortRun, match="rank 0 lost contact with rank 1, which closed its connection"):
            causal_train.main(small_run_argv())
        # torchrun's SIGTERM to the survivors must not cut the report short.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
