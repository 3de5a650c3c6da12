"""What a training run is told: the distiller's settings, the run's other flags, and the process's place.

Three frozen dataclasses, built once by `causal_train.py` from its flags and the launcher's
environment (tests and benchmarks build them directly):

* `TrainingConfig` -- the method and optimisation settings `CausalDistiller` reads: one field per
  training flag of the same name;
* `RunOptions` -- the other flags: the run folder, data, models, launch and logging;
* `RunContext` -- where this process runs: rank, world size, device, the tokenizer's special ids,
  the teacher's maximum input length and the run folder.

Each flag is declared once, as a field of `TrainingConfig` or `RunOptions`: its default and its
`--help` line (`metadata["help"]`) live there, and `causal_train.build_parser` makes the parser from
the fields. A field without a default is a required flag; a bool field is a `store_true` flag, or,
when its default is True, a flag pair `--<name>` / `--no_<name>` (`metadata["negation_help"]`).

The user's arguments are never rewritten; `parameters.json` records them as given, next to the
context the run derived from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from architectures import student_types, teacher_types

LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of the distiller. Each field is the training flag `--<name>`, with its default and help."""

    # objective: which losses, with which weights
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the ce losses."})
    alpha_ce: float = field(default=0.5, metadata={"help": "Weight of the distillation (KL) loss."})
    alpha_mlm: float = field(default=0.0, metadata={"help": "Weight of the MLM loss (with --mlm)."})
    alpha_clm: float = field(default=0.5, metadata={"help": "Weight of the CLM loss (without --mlm)."})
    alpha_mse: float = field(default=0.0, metadata={"help": "Weight of the logits MSE loss."})
    alpha_cos: float = field(default=0.0, metadata={"help": "Weight of the last-hidden-state cosine loss."})
    alpha_causal_ce: float = field(default=0.0, metadata={"help": "Weight of the counterfactual (DIITO) ce loss."})
    alpha_causal_cos: float = field(default=0.0, metadata={"help": "Weight of the counterfactual cosine loss."})
    mlm: bool = field(default=False, metadata={"help": "Masked LM objective (else causal LM)."})
    # MLM corruption
    mlm_mask_prop: float = field(default=0.15, metadata={"help": "Share of tokens chosen as MLM targets."})
    word_mask: float = field(default=0.8, metadata={"help": "Share of targets replaced by [MASK]."})
    word_keep: float = field(default=0.1, metadata={"help": "Share of targets kept."})
    word_rand: float = field(default=0.1, metadata={"help": "Share of targets replaced by a random token."})
    restrict_ce_to_mask: bool = field(default=False, metadata={"help": "ce (and causal_ce) only on MLM targets."})
    # interchange interventions
    interchange_prop: float = field(default=0.3, metadata={"help": "Share of min(base, dual) length interchanged."})
    interchange_max_token: int = field(default=-1, metadata={"help": "Cap on interchanged positions (-1: none)."})
    interchange_consecutive_only: bool = field(default=False, metadata={"help": "Interchange one contiguous span."})
    interchange_masked_token_only: bool = field(
        default=False, metadata={"help": "Interchange at the base's MLM targets."}
    )
    data_augment: bool = field(default=False, metadata={"help": "Swap token ids instead of hidden states."})
    include_crossway: bool = field(
        default=False, metadata={"help": "Also train the (dual, base) direction each batch."}
    )
    fast_mode: bool = field(
        default=False,
        metadata={
            "help": "Faster DIITO, not identical to the original: duals are other rows of the same batch (no source "
            "runs), and the student's counterfactual run reuses its base run below the intervention."
        },
    )
    # data and optimisation
    n_epoch: int = field(default=3, metadata={"help": "Epochs over the corpus (the limit when --max_steps is set)."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimizer steps (-1: n_epoch epochs; else > 0)."}
    )
    batch_size: int = field(default=5, metadata={"help": "Sequences per process per micro-batch."})
    group_by_size: bool = field(
        default=True,
        metadata={"help": "Batch sequences of similar length.", "negation_help": "Turn length grouping off."},
    )
    gradient_accumulation_steps: int = field(default=50, metadata={"help": "Micro-batches per optimizer step."})
    warmup_prop: float = field(default=0.05, metadata={"help": "Share of the steps with linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    learning_rate: float = field(
        default=5e-4,
        metadata={"help": "Peak learning rate of the linear schedule (a new value on --resume applies from there on)."},
    )
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient norm clipping threshold."})
    skip_nonfinite_loss: bool = field(
        default=False, metadata={"help": "Skip a step whose loss is NaN/inf instead of stopping."}
    )
    fp16: bool = field(default=False, metadata={"help": "Mixed precision float16 (torch.amp + GradScaler)."})
    bf16: bool = field(default=False, metadata={"help": "Mixed precision bfloat16 (torch.amp)."})
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard teacher and student per transformer block with FSDP2 over the torchrun processes "
            "(2 or more) instead of a full copy of each on every process (DDP)."
        },
    )
    fsdp_offload_teacher: bool = field(
        default=False,
        metadata={"help": "With --fsdp: keep the teacher's shards in CPU memory, copied to the device block by block."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Keep only each student block's inputs for backward and recompute the rest there: less "
            "activation memory for about one more student forward. Same gradients."
        },
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    seed: int = field(default=56, metadata={"help": "Seeds python, numpy and torch; dual pairing and draws follow."})
    # logging and checkpoints
    log_interval: int = field(
        default=500, metadata={"help": "Micro-batches between TensorBoard logs and a console loss line."}
    )
    checkpoint_interval: int = field(
        default=4000,
        metadata={
            "help": "Micro-batches between checkpoints: the training state, checkpoint.pth and a checkpoint-<step>/ "
            "model folder."
        },
    )
    save_total_limit: int = field(
        default=1,
        metadata={"help": "Full training states kept in checkpoints/, and checkpoint-<step>/ model folders kept."},
    )

    @property
    def alphas(self) -> dict[str, float]:
        """Loss name -> weight, for every loss (zeros included)."""
        return {name: float(getattr(self, f"alpha_{name}")) for name in LOSS_NAMES}

    @property
    def causal(self) -> bool:
        """Whether a step makes counterfactual runs (a causal loss has a non-zero weight)."""
        return self.alpha_causal_ce > 0 or self.alpha_causal_cos > 0


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The training flags the distiller does not read: run folder, data, models, launch, logging.

    Each field is the flag `--<name>`, with its default and help; a field without a default is a
    required flag. In --help these flags come before the `TrainingConfig` ones.
    """

    # run folder and data
    force: bool = field(
        default=False,
        metadata={"help": "Replace dump_path/run_name if it is a previous run's folder (never any other folder)."},
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue the run in dump_path/run_name from its latest intact state."}
    )
    dump_path: str = field(metadata={"help": "Folder under which the run folder is created."})
    run_name: str | None = field(
        default=None, metadata={"help": "Run folder name (default: built from the main settings)."}
    )
    data_file: str = field(metadata={"help": "Binarized corpus: *.pickle or *.tokens.npy."})
    # models
    student_type: str = field(metadata={"help": "Student architecture.", "choices": student_types()})
    student_config: str = field(metadata={"help": "Student architecture (JSON config)."})
    student_pretrained_weights: str | None = field(
        default=None, metadata={"help": "Student initial state dict (.pth)."}
    )
    teacher_type: str = field(metadata={"help": "Teacher architecture.", "choices": teacher_types()})
    teacher_name: str = field(metadata={"help": "Teacher: Hub name or local folder."})
    teacher_fp16: bool = field(
        default=False,
        metadata={
            "help": "Keep the teacher's weights in half precision: bfloat16 under --bf16, float16 under --fp16; "
            "without mixed precision float16 on GPU, bfloat16 on CPU."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Hugging Face cache folder for the teacher and its tokenizer."}
    )
    # MLM target sampling, frozen parts, the mapping
    mlm_smoothing: float = field(default=0.7, metadata={"help": "Target sampling weight is count ** -mlm_smoothing."})
    token_counts: str | None = field(
        default=None, metadata={"help": "Token counts pickle (list of vocab_size ints); required with --mlm."}
    )
    freeze_pos_embs: bool = field(default=False, metadata={"help": "Freeze the student's position embeddings."})
    freeze_token_type_embds: bool = field(default=False, metadata={"help": "Freeze token type embeddings (roberta)."})
    neuron_mapping: str | None = field(default=None, metadata={"help": "Teacher/student variable mapping (.nm JSON)."})
    interchange_mlm: bool = field(
        default=False,
        metadata={
            "help": "Accepted for compatibility: the original stored it and never read it; no effect (a warning "
            "says so)."
        },
    )
    parallel_crossway: bool = field(default=False, metadata={"help": "Abandoned in the original; refused."})
    initializer_range: float = field(default=0.02, metadata={"help": "Std of the student's random init."})
    # precision and launch
    fp16_opt_level: str = field(
        default="O1", metadata={"help": "Accepted for compatibility; apex levels map to --fp16."}
    )
    tf32: bool = field(
        default=False,
        metadata={
            "help": "Let float32 matmuls and convolutions use TF32 on Ampere and newer GPUs (faster, ~10 mantissa "
            "bits); off keeps exact float32."
        },
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a collective waits for the other processes (e.g. while rank 0 writes a large "
            "checkpoint) before the run fails."
        },
    )
    n_gpu: int = field(default=1, metadata={"help": "GPUs per node; 0 runs on CPU."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the launcher.", "aliases": ("--local-rank",)})
    # logging
    is_wandb: bool = field(
        default=False,
        metadata={
            "help": "Also log the TensorBoard scalars to Weights & Biases (needs the wandb package); the wandb run "
            "is named after the run folder."
        },
    )
    wandb_project: str = field(
        default="Causal-BERT-Distillation", metadata={"help": "Weights & Biases project (--is_wandb)."}
    )


def flag_values(config: TrainingConfig, options: RunOptions) -> dict[str, Any]:
    """Every training flag's value by name, in --help order (the `RunOptions` flags, then the `TrainingConfig` ones)."""
    return {**asdict(options), **asdict(config)}


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
