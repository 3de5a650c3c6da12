"""Resident memory per stage: the quickstart process's peak (Linux's VmHWM, restarted per stage), a
training child's (its ru_maxrss), and handing freed heap back to the system between stages.

Elsewhere than on Linux with glibc these are no-ops and the peaks are unknown (None).
"""

from __future__ import annotations

import gc
import os
import subprocess
from pathlib import Path

from utils import trim_heap

MB = 1024 * 1024


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS count at its current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MB) since the last `reset_peak_rss`."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kb = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
    return kb[0] * 1024 / MB if kb else None


def release_memory() -> None:
    """Free what a finished stage left unreachable and give the heap back: glibc keeps freed memory for
    reuse, and the parent's kept heap would sit beside every training child's."""
    gc.collect()
    trim_heap()


def wait_with_peak_rss(child: subprocess.Popen) -> tuple[int, float | None]:
    """(exit status, peak resident memory in MB) of `child`, once it ends.

    Ctrl-C reaches the child too, which saves its state and stops: wait for it instead of killing it.
    """
    while True:
        try:
            _, status, usage = os.wait4(child.pid, 0)
            break
        except KeyboardInterrupt:
            continue
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024 / MB  # ru_maxrss: kB on Linux
