"""How a training run is asked to stop: SIGTERM or SIGINT on any rank, agreed on by all of them.

A signal only sets a flag (`StopSignals.requested`). After every micro-batch the loop calls
`agree()`: a host-side all-reduce (a gloo group, also under NCCL) that waits for the other ranks,
never for the device. Once any rank was signalled, every rank has the same `reason`, saves its
state and stops. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopSignals:
    """This process's stop request and the reason all ranks agreed on; `distributed`: several processes."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.requested: str | None = None  # set by this process's signal handler
        self.reason: str | None = None  # the same on every rank: set when all ranks agree
        self.host_group = None
        if distributed and dist.get_backend() != "gloo":
            self.host_group = dist.new_group(backend="gloo")
        self._previous: dict = {}

    def install(self) -> None:
        """SIGTERM / SIGINT ask for a stop at the next micro-batch; a second SIGINT raises KeyboardInterrupt."""

        def handler(signum, _frame):
            if signum == signal.SIGINT and self.requested is not None:
                raise KeyboardInterrupt
            self.requested = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, handler)

    def ignore_sigterm_after(self) -> None:
        """`restore()` ignores SIGTERM instead of restoring its handler.

        For a run that lost a rank: the launcher's SIGTERM to the survivors must not cut short their
        one-line report (causal_train.main writes it).
        """
        self._previous[signal.SIGTERM] = signal.SIG_IGN

    def restore(self) -> None:
        """Put back the handlers `install()` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agree(self) -> None:
        """Turn a stop signal received by any rank into `reason` on all of them."""
        stop = self.requested is not None
        if self.distributed:
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
            stop = bool(flag[0])
        if stop and self.reason is None:
            self.reason = self.requested or "a signal on another rank"
