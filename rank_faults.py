"""What the surviving ranks of a multi-process run say when another rank dies or stalls.

A collective whose peer is gone fails on the ranks still running: at once when the peer's
process ended (gloo: its connection is reset or closed), or after `--ddp_timeout` when the peer
stopped calling collectives (a stall). The backend's error names neither the rank nor the flag:
`lost_rank_message` turns it into one line that does.

Which rank is gone: with two processes, the other one. With more, the survivors answer a roll
call in the rendezvous store (torchrun's agent holds it, so it outlives any worker) and the ranks
that do not answer within `ROLL_CALL_SECONDS` are named.
"""

from __future__ import annotations

import os
import re
import time

import torch.distributed as dist

from training_config import RunContext

# How long a survivor waits for the others to answer the roll call (at most --ddp_timeout).
ROLL_CALL_SECONDS = 10.0

# Texts of gloo's errors when a peer is gone (they are plain RuntimeErrors); NCCL raises DistBackendError.
_GLOO_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "pair closure")
_TIMEOUT = re.compile(r"[Tt]imed? ?out|timeout")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective (or the rendezvous store) failing because another rank is gone."""
    if isinstance(e, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    return isinstance(e, RuntimeError) and any(text in str(e) for text in _GLOO_PEER_LOST)


def lost_rank_message(e: BaseException, context: RunContext, ddp_timeout: int) -> str:
    """One line for a survivor: which rank was lost, how, and that the saved states are kept."""
    missing = other_ranks(context)
    if len(missing) > 1:
        answered = roll_call(context, min(ROLL_CALL_SECONDS, ddp_timeout))
        missing = [r for r in missing if r not in answered] if answered is not None else missing
    if _TIMEOUT.search(str(e)):
        how = (
            f"did not answer within --ddp_timeout {ddp_timeout} s (it stalled, or its step or a save took longer: "
            "raise --ddp_timeout if that is expected)"
        )
    else:
        how = "closed its connection (its process ended: see its own output, or the launcher's summary)"
    if not missing:  # every rank answered the roll call: the link between them failed, not a rank
        who = "another rank"
    else:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
    return (
        f"rank {context.global_rank} lost contact with {who}, which {how}; "
        "the states saved so far are kept: relaunch with --resume to continue from the newest"
    )


def not_connected_message(e: BaseException, global_rank: int, world_size: int, ddp_timeout: int) -> str:
    """One line for a rank whose process group could not be formed (a peer died or started too late)."""
    return (
        f"rank {global_rank} could not connect to the other {world_size - 1} process(es) within --ddp_timeout "
        f"{ddp_timeout} s ({backend_reason(e)}): one of them ended or started too late; see its own output, "
        "or raise --ddp_timeout if start-up is slow"
    )


def backend_reason(e: BaseException) -> str:
    """The backend's message without its source locations (`[.../pair.cc:152] `) or advice, on one line."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\] ?", "", " ".join(str(e).split()))
    return re.split(r"(?<=\w)\. ", text, maxsplit=1)[0] or type(e).__name__


def other_ranks(context: RunContext) -> list[int]:
    return [r for r in range(context.world_size) if r != context.global_rank]


def roll_call(context: RunContext, wait_s: float) -> set[int] | None:
    """Ranks that answered within `wait_s` seconds (this one included), or None if the store is gone too.

    Every survivor that hits a lost collective answers; a dead or stalled rank never does.
    """
    prefix = f"diito_roll_call/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    keys = [f"{prefix}{r}" for r in range(context.world_size)]
    try:
        # Private, but the only handle on the store the process group was made with.
        store = dist.distributed_c10d._get_default_store()
        store.set(keys[context.global_rank], "here")
        deadline = time.monotonic() + wait_s
        while True:
            answered = {r for r, key in enumerate(keys) if store.check([key])}
            if len(answered) == context.world_size or time.monotonic() >= deadline:
                return answered
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # the store went with the rank that held it
        return None
