"""What a training run is told: the distiller's settings and the process's place in the run.

Two frozen dataclasses, built once by `causal_train.py` from its flags and the launcher's
environment, and passed to `CausalDistiller` (tests and benchmarks build them directly):

* `TrainingConfig` -- the method and optimisation settings, one field per training flag of the
  same name (defaults included: the CLI takes its defaults from here);
* `RunContext` -- where this process runs: rank, world size, device, the tokenizer's special ids,
  the teacher's maximum input length and the run folder.

The user's arguments are never rewritten; `parameters.json` records them as given, next to the
context the run derived from them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of the distiller. Each field is the training flag `--<name>`; its help is in `causal_train.py`."""

    # objective: which losses, with which weights
    mlm: bool = False
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_mlm: float = 0.0
    alpha_clm: float = 0.5
    alpha_mse: float = 0.0
    alpha_cos: float = 0.0
    alpha_causal_ce: float = 0.0
    alpha_causal_cos: float = 0.0
    # MLM corruption
    mlm_mask_prop: float = 0.15
    word_mask: float = 0.8
    word_keep: float = 0.1
    word_rand: float = 0.1
    restrict_ce_to_mask: bool = False
    # interchange interventions
    interchange_prop: float = 0.3
    interchange_max_token: int = -1
    interchange_consecutive_only: bool = False
    interchange_masked_token_only: bool = False
    data_augment: bool = False
    include_crossway: bool = False
    fast_mode: bool = False
    # data and optimisation
    n_epoch: int = 3
    max_steps: int = -1
    batch_size: int = 5
    group_by_size: bool = True
    gradient_accumulation_steps: int = 50
    warmup_prop: float = 0.05
    weight_decay: float = 0.0
    learning_rate: float = 5e-4
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 5.0
    skip_nonfinite_loss: bool = False
    fp16: bool = False
    bf16: bool = False
    num_workers: int = 0
    seed: int = 56
    # logging and checkpoints
    log_interval: int = 500
    checkpoint_interval: int = 4000
    save_total_limit: int = 1

    @property
    def alphas(self) -> dict[str, float]:
        """Loss name -> weight, for every loss (zeros included)."""
        return {name: float(getattr(self, f"alpha_{name}")) for name in LOSS_NAMES}

    @property
    def causal(self) -> bool:
        """Whether a step makes counterfactual runs (a causal loss has a non-zero weight)."""
        return self.alpha_causal_ce > 0 or self.alpha_causal_cos > 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The fields of `args` (parsed training flags) that the distiller uses."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field `name` (the CLI's default for `--<name>`)."""
        return cls.__dataclass_fields__[name].default


@dataclass(frozen=True)
class RunContext:
    """This process's place in the run. One process is rank 0 of a world of 1."""

    global_rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    special_token_ids: dict[str, int] = field(default_factory=dict)  # e.g. {"mask_token": 103, ...}
    max_model_input_size: int = 512  # longest input the teacher accepts, in tokens
    run_dir: Path = Path(".")  # dump_path/run_name: everything the run writes goes here

    @property
    def is_master(self) -> bool:
        """Rank 0: the process that logs and writes the run folder's shared files."""
        return self.global_rank == 0

    @property
    def multi_process(self) -> bool:
        """Several processes (DDP): collectives are needed."""
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for parameters.json and TensorBoard."""
        return {
            "world_size": self.world_size,
            "device": str(self.device),
            "special_tok_ids": dict(self.special_token_ids),
            "max_model_input_size": self.max_model_input_size,
            "run_dir": str(self.run_dir),
        }
