"""The optimizer side of a distillation run: AdamW over named parameter groups, the linear warm-up
schedule, the fp16 grad scaler, and the accumulation window.

A window is the micro-batches summed into one optimizer step. Their metrics and non-finite flags
stay on the device until the window settles (`StepWindow.settle`): one all-reduce and one device
read per window. A non-finite loss or gradient norm stops the run (`StopTraining`) or, with
--skip_nonfinite_loss, drops the window; a dropped window still advances the schedule and the step
count, so --max_steps ends. The distiller owns the `StepWindow` and passes it the training counters
(`checkpointing.TrainState`), which a resumed run replaces.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn
from transformers import get_linear_schedule_with_warmup

import sharding
from checkpointing import TrainState
from training_config import TrainingConfig

logger = logging.getLogger(__name__)

# Share of skipped optimizer steps (after SKIP_WARN_AFTER steps) that earns a console warning.
SKIP_WARN_SHARE, SKIP_WARN_AFTER = 0.5, 10


class StopTraining(Exception):
    """Raised inside the loop to end training on a non-finite loss or gradient (a signal only sets a flag)."""


def build_optimizer(student: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and on every LayerNorm weight (any 1-D parameter)."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    # Named: a resumed run matches the saved groups by name (checkpointing.load_optimizer_state).
    groups = [
        {"name": "decay", "params": decay, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, eps=config.adam_epsilon, betas=(0.9, 0.98))


class StepWindow:
    """Optimizer, schedule and scaler of `student`, and the pending micro-batches of the open window.

    batches_per_epoch: micro-batches of one epoch on this rank (an epoch's last window may be short);
    num_steps_total: optimizer steps of the whole run (the schedule's length).
    """

    def __init__(
        self,
        student: nn.Module,
        config: TrainingConfig,
        *,
        device_type: str,
        batches_per_epoch: int,
        num_steps_total: int,
        distributed: bool,
        is_master: bool,
    ):
        self.student, self.config = student, config
        self.accum = config.gradient_accumulation_steps
        self.batches_per_epoch = batches_per_epoch
        self.distributed, self.is_master = distributed, is_master
        self.optimizer = build_optimizer(student, config)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=math.ceil(num_steps_total * config.warmup_prop),
            num_training_steps=num_steps_total,
        )
        self.scaler = torch.amp.GradScaler(device_type, enabled=config.fp16)
        # (micro-batch, non-finite flag, metrics) of the micro-batches not read back yet: device tensors.
        self.pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.last_metrics: dict[str, float] = {}
        self._warned_skips = False

    def size(self, st: TrainState) -> int:
        """Micro-batches in the current window: the full window, or what the epoch has left."""
        start = st.batch_in_epoch // self.accum * self.accum
        return min(self.accum, self.batches_per_epoch - start)

    def ends_at(self, st: TrainState) -> bool:
        """Whether the next micro-batch (number `st.batch_in_epoch`) closes its window or the epoch."""
        return (st.batch_in_epoch + 1) % self.accum == 0 or st.batch_in_epoch + 1 == self.batches_per_epoch

    def mid_window(self, st: TrainState) -> bool:
        """Whether some micro-batches of the open window have run (their gradient sums are kept in states)."""
        return st.batch_in_epoch % self.accum != 0

    def add(self, micro_batch: int, nonfinite: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Keep a micro-batch's (device) non-finite flag and metrics until the window settles."""
        self.pending.append((micro_batch, nonfinite, metrics))

    def settle(self, st: TrainState) -> None:
        """Read the pending micro-batches' metrics and non-finite flags: one all-reduce, one device read.

        Called at the end of each window, before a state is saved and at log steps. A non-finite
        loss on any rank stops the run, or (--skip_nonfinite_loss) drops the window.
        """
        pending, self.pending = self.pending, []
        if not pending:
            return
        bad = torch.stack([flag for _, flag, _ in pending]).float()
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        names = [list(metrics) for _, _, metrics in pending]
        values = torch.cat([bad, *(torch.stack(list(m.values())) for _, _, m in pending)]).tolist()
        flags, values = values[: len(pending)], values[len(pending) :]
        for (micro_batch, _, _), keys, flag in zip(pending, names, flags, strict=False):
            metrics, values = dict(zip(keys, values[: len(keys)], strict=False)), values[len(keys) :]
            if flag:
                self.nonfinite(st, f"loss at micro-batch {micro_batch}")
            st.last_loss = {k: v for k, v in metrics.items() if k.startswith("loss")}
            st.epoch_loss_sum += metrics["loss"]
            st.epoch_loss_count += 1
            self.last_metrics = metrics

    def nonfinite(self, st: TrainState, what: str) -> None:
        """Stop with a message, or (--skip_nonfinite_loss) drop the current window."""
        if not self.config.skip_nonfinite_loss:
            raise StopTraining(
                f"non-finite {what} (epoch {st.epoch}, optimizer step {st.n_optim_steps}); the last good "
                "checkpoint is kept. Lower the learning rate, use --bf16 instead of --fp16, "
                "or pass --skip_nonfinite_loss"
            )
        if self.is_master and not st.window_skipped:
            logger.warning("non-finite %s: this optimizer step is skipped", what)
        st.window_skipped = True
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, st: TrainState) -> float | None:
        """Settle, unscale, clip, step, schedule, zero. Returns the grad norm before clipping (None if skipped)."""
        self.settle(st)
        norm = None
        if not st.window_skipped:
            self.scaler.unscale_(self.optimizer)
            norm = sharding.as_float(
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm)
            )
            # GradScaler skips an fp16 step with inf gradients itself (and lowers the scale); without
            # it, a non-finite norm would write NaN into the weights. Gradients are all-reduced, so
            # every rank sees the same norm and decides alike.
            if not self.scaler.is_enabled() and not math.isfinite(norm):
                self.nonfinite(st, "gradient norm")
        skipped = st.window_skipped
        if skipped:
            st.n_skipped_steps += 1
            st.window_skipped = False
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.n_optim_steps += 1
        if skipped:
            self._warn_if_most_steps_skipped(st)
        return norm

    def _warn_if_most_steps_skipped(self, st: TrainState) -> None:
        if (
            self.is_master
            and not self._warned_skips
            and st.n_optim_steps >= SKIP_WARN_AFTER
            and st.n_skipped_steps > SKIP_WARN_SHARE * st.n_optim_steps
        ):
            self._warned_skips = True
            logger.warning(
                "%d of the %d optimizer steps so far were skipped for a non-finite loss or gradient: the run is "
                "hardly training (lower the learning rate, or use --bf16 instead of --fp16)",
                st.n_skipped_steps,
                st.n_optim_steps,
            )

    def log_skip_summary(self, st: TrainState) -> None:
        """At the end of training (rank 0): how many optimizer steps were skipped, if any."""
        if self.is_master and st.n_skipped_steps:
            logger.warning(
                "%d of %d optimizer steps were skipped for a non-finite loss or gradient",
                st.n_skipped_steps,
                st.n_optim_steps,
            )
