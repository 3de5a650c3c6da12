"""Where rank 0 records a run: TensorBoard under <run_dir>/log/train, an optional Weights & Biases
run, and one console line per log step. One metrics dict per log step goes to all three."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil
from torch import nn

from checkpointing import TrainState

logger = logging.getLogger(__name__)


class TrainingLog:
    """The run's logs from the micro-batch `state.n_total_iter` on; `wandb`: a started run, or None."""

    def __init__(self, run_dir: Path, state: TrainState, wandb: Any = None):
        from torch.utils.tensorboard import SummaryWriter

        # On resume, hide the events a killed run logged after its last saved state.
        self.tensorboard = SummaryWriter(
            log_dir=str(run_dir / "log" / "train"), flush_secs=60, purge_step=state.n_total_iter or None
        )
        self.wandb = wandb
        self.last_time, self.last_tokens = time.time(), state.n_tokens

    def configs(self, description: dict, student: Any) -> None:
        """The run's description and the student's config, as TensorBoard texts `config`, `config/student`."""
        text = json.dumps(description, indent=2, sort_keys=True, default=str)
        self.tensorboard.add_text("config", f"<pre>{text}</pre>", 0)
        self.tensorboard.add_text("config/student", f"<pre>{student.config.to_json_string()}</pre>", 0)

    def parameters(self, student: nn.Module, step: int) -> None:
        """Mean and std of every student parameter and of its gradient (before the step zeroes it)."""
        tb = self.tensorboard
        for name, param in student.named_parameters():
            tb.add_scalar(f"parameter_mean/{name}", param.data.mean(), step)
            tb.add_scalar(f"parameter_std/{name}", param.data.std(), step)
            if param.grad is not None:
                tb.add_scalar(f"grad_mean/{name}", param.grad.data.mean(), step)
                tb.add_scalar(f"grad_std/{name}", param.grad.data.std(), step)

    def step(
        self, metrics: dict[str, float], state: TrainState, lr: float, grad_norm: float | None, total_steps: int
    ) -> None:
        """One log step's metrics (losses, interchange accuracy), learning rate, gradient norm (None:
        no optimizer step here, or a skipped one), memory (MB), seconds and tokens/s since the last."""
        step, st = state.n_total_iter, state
        now = time.time()
        tokens_per_s = (st.n_tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        scalars = {"losses/cum_avg_loss_epoch": st.epoch_loss_sum / max(st.epoch_loss_count, 1)}
        for key, value in metrics.items():
            tag = "losses/loss" if key == "loss" else f"losses/{key}" if key.startswith("loss_") else f"metrics/{key}"
            scalars[tag] = value
        scalars["learning_rate/lr"] = lr
        if grad_norm is not None:
            scalars["global/grad_norm"] = grad_norm
        scalars["global/memory_usage"] = psutil.Process(os.getpid()).memory_info().rss / 1e6
        scalars["global/speed"] = now - self.last_time
        scalars["global/tokens_per_s"] = tokens_per_s
        scalars["global/skipped_steps"] = st.n_skipped_steps
        for tag, value in scalars.items():
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        terms = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
        logger.info(
            "step %d/%d | micro-batch %d | loss %.4f | %s | lr %.3g | %.0f tokens/s",
            st.n_optim_steps,
            total_steps,
            step,
            metrics["loss"],
            terms,
            lr,
            tokens_per_s,
        )
        self.last_time, self.last_tokens = now, st.n_tokens

    def epoch(self, epoch: int, loss: float) -> None:
        self.tensorboard.add_scalar("epoch/loss", loss, epoch)

    def flush(self) -> None:
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()
