"""Starting training runs as subprocesses (through tests/hooked_train.py) and waiting for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO

TIMEOUT = 300  # seconds, for any one subprocess (they take a few seconds on an idle machine)
HOOKED_TRAIN = REPO / "tests" / "hooked_train.py"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3")


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


def launch(
    started: list, args: list[str], log: Path, prefix: tuple[str, ...] = (sys.executable,), **hooks
) -> subprocess.Popen:
    """Start `prefix tests/hooked_train.py args` with hooks as TEST_* variables, output into `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **{f"TEST_{k.upper()}": str(v) for k, v in hooks.items()})
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*prefix, str(HOOKED_TRAIN), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
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
