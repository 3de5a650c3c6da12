"""Resident memory per stage: the quickstart process's peak (Linux's VmHWM, restarted per stage), a
training child's (its ru_maxrss), handing freed heap back to the system between stages, and keeping
glibc's heap from fragmenting during a stage.

Elsewhere than on Linux with glibc these are no-ops and the peaks are unknown (None).
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
from pathlib import Path

MB = 1024 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
MMAP_THRESHOLD = 64 * 1024  # bytes
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


def limit_heap_fragmentation() -> None:
    """Serve every allocation of `MMAP_THRESHOLD` bytes or more (every tensor but the smallest) from its
    own mapping, returned to the system when freed. Children get the same through `child_env`.

    glibc's default threshold rises to the size of the largest block freed (up to 32 MB), after which
    tensors of a few MB come from the heap, whose freed holes are reused poorly while training: the
    MiniLM teacher stage peaked at 4.6 GB with the default and 2.4 GB with this one. A threshold the
    user set in the environment is left alone (glibc applied it at start-up).
    """
    if MMAP_THRESHOLD_ENV in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def child_env() -> dict[str, str]:
    """This environment, with glibc's mmap threshold set as `limit_heap_fragmentation` sets it (glibc
    reads the variable at start-up; other C libraries ignore it)."""
    return {MMAP_THRESHOLD_ENV: str(MMAP_THRESHOLD), **os.environ}


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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
