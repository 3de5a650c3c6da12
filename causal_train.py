"""Distil a teacher LM into a student with DIITO (distillation + interchange intervention training).

    python causal_train.py --force --n_gpu 0 --student_type distilbert \\
        --student_config training_configs/distilbert-base-uncased-large.json \\
        --student_pretrained_weights distillation_checkpoints/bert-base-uncased_num_layer_6.pth \\
        --teacher_type bert --teacher_name bert-base-uncased \\
        --neuron_mapping training_configs/single_middle_layer_6.nm \\
        --mlm --alpha_ce 0.25 --alpha_mlm 0.25 --alpha_cos 0.25 --alpha_clm 0.0 \\
        --alpha_causal_ce 0.25 --alpha_causal_cos 0.0 \\
        --interchange_prop 0.3 --interchange_max_token -1 --interchange_consecutive_only \\
        --dump_path results/ --data_file data/binarized_text.train.bert-base-uncased.pickle \\
        --token_counts data/binarized_text.train.token_counts.bert-base-uncased.pickle

Multi-GPU: ``torchrun --nproc_per_node N causal_train.py ...`` (or the original ``--n_gpu N``
with a launcher that sets WORLD_SIZE / RANK / LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import signal
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoTokenizer

import counterfactual_utils as cf
import masking

# Per-family facts (classes, parts, framing, allowed pairs) are rows of architectures.ARCHITECTURES.
from architectures import (  # noqa: F401  (re-exported for scripts)
    ARCHITECTURES,
    SPECIAL_TOKENS,
    check_student_teacher,
    max_positions,
    special_token_ids,
    student_types,
    teacher_types,
)
from causal_distiller import CausalDistiller, StopTraining
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from token_store import PICKLE_SUFFIXES, check_vocab_range, load_sequences
from training_config import RunContext, TrainingConfig
from utils import UserError, cannot_write_in, nearest_existing, require_file, run_cli, set_seed, write_json

logger = logging.getLogger("causal_train")

EXAMPLE = """example (the paper's recipe: a 6-layer DistilBERT from bert-base-uncased, on CPU):
  python causal_train.py --force --n_gpu 0 --student_type distilbert \\
      --student_config training_configs/distilbert-base-uncased-large.json \\
      --teacher_type bert --teacher_name bert-base-uncased \\
      --neuron_mapping training_configs/single_middle_layer_6.nm \\
      --mlm --alpha_ce 0.25 --alpha_mlm 0.25 --alpha_cos 0.25 --alpha_clm 0 --alpha_causal_ce 0.25 \\
      --dump_path results/ --data_file data/binarized_text.train.bert-base-uncased.tokens.npy \\
      --token_counts data/binarized_text.train.token_counts.bert-base-uncased.pickle
multi-GPU: torchrun --nproc_per_node N causal_train.py --n_gpu N ...
"""
# Help of the two flags whose lines the architecture table owns.
TYPE_HELP = {"student_type": "Student architecture.", "teacher_type": "Teacher architecture."}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLE, formatter_class=_HelpFormatter)
    a = p.add_argument
    d = TrainingConfig.default  # the distiller's settings take their defaults from TrainingConfig
    a(
        "--force",
        action="store_true",
        help="Replace dump_path/run_name if it is a previous run's folder (never any other folder).",
    )
    a("--resume", action="store_true", help="Continue the run in dump_path/run_name from its latest intact state.")
    a("--dump_path", type=str, required=True, help="Folder under which the run folder is created.")
    a("--run_name", type=str, default=None, help="Run folder name (default: built from the main settings).")
    a("--data_file", type=str, required=True, help="Binarized corpus: *.pickle or *.tokens.npy.")

    a("--student_type", type=str, choices=student_types(), required=True)
    a("--student_config", type=str, required=True, help="Student architecture (JSON config).")
    a("--student_pretrained_weights", type=str, default=None, help="Student initial state dict (.pth).")
    a("--teacher_type", choices=teacher_types(), required=True)
    a("--teacher_name", type=str, required=True, help="Teacher: Hub name or local folder.")
    a(
        "--teacher_fp16",
        action="store_true",
        help="Keep the teacher's weights in half precision: bfloat16 under --bf16, float16 under --fp16; without "
        "mixed precision float16 on GPU, bfloat16 on CPU.",
    )
    a("--cache_dir", type=str, default=None, help="Hugging Face cache folder for the teacher and its tokenizer.")

    a("--temperature", default=d("temperature"), type=float, help="Softmax temperature of the ce losses.")
    a("--alpha_ce", default=d("alpha_ce"), type=float, help="Weight of the distillation (KL) loss.")
    a("--alpha_mlm", default=d("alpha_mlm"), type=float, help="Weight of the MLM loss (with --mlm).")
    a("--alpha_clm", default=d("alpha_clm"), type=float, help="Weight of the CLM loss (without --mlm).")
    a("--alpha_mse", default=d("alpha_mse"), type=float, help="Weight of the logits MSE loss.")
    a("--alpha_cos", default=d("alpha_cos"), type=float, help="Weight of the last-hidden-state cosine loss.")
    a(
        "--alpha_causal_ce",
        default=d("alpha_causal_ce"),
        type=float,
        help="Weight of the counterfactual (DIITO) ce loss.",
    )
    a("--alpha_causal_cos", default=d("alpha_causal_cos"), type=float, help="Weight of the counterfactual cosine loss.")

    a("--mlm", action="store_true", help="Masked LM objective (else causal LM).")
    a("--mlm_mask_prop", default=d("mlm_mask_prop"), type=float, help="Share of tokens chosen as MLM targets.")
    a("--word_mask", default=d("word_mask"), type=float, help="Share of targets replaced by [MASK].")
    a("--word_keep", default=d("word_keep"), type=float, help="Share of targets kept.")
    a("--word_rand", default=d("word_rand"), type=float, help="Share of targets replaced by a random token.")
    a("--mlm_smoothing", default=0.7, type=float, help="Target sampling weight is count ** -mlm_smoothing.")
    a("--token_counts", type=str, help="Token counts pickle (list of vocab_size ints); required with --mlm.")
    a("--restrict_ce_to_mask", action="store_true", help="ce (and causal_ce) only on MLM targets.")
    a("--freeze_pos_embs", action="store_true", help="Freeze the student's position embeddings.")
    a("--freeze_token_type_embds", action="store_true", help="Freeze token type embeddings (roberta).")

    a("--neuron_mapping", type=str, default=None, help="Teacher/student variable mapping (.nm JSON).")
    a(
        "--interchange_prop",
        type=float,
        default=d("interchange_prop"),
        help="Share of min(base, dual) length interchanged.",
    )
    a(
        "--interchange_max_token",
        type=int,
        default=d("interchange_max_token"),
        help="Cap on interchanged positions (-1: none).",
    )
    a("--interchange_consecutive_only", action="store_true", help="Interchange one contiguous span.")
    a("--interchange_masked_token_only", action="store_true", help="Interchange at the base's MLM targets.")
    a("--data_augment", action="store_true", help="Swap token ids instead of hidden states.")
    a("--include_crossway", action="store_true", help="Also train the (dual, base) direction each batch.")
    a(
        "--interchange_mlm",
        action="store_true",
        help="Accepted for compatibility: the original stored it and never read it; no effect (a warning says so).",
    )
    a("--parallel_crossway", action="store_true", help="Abandoned in the original; refused.")
    a(
        "--fast_mode",
        action="store_true",
        help="Faster DIITO, not identical to the original: duals are other rows of the same batch (no source "
        "runs), and the student's counterfactual run reuses its base run below the intervention.",
    )

    a("--n_epoch", type=int, default=d("n_epoch"), help="Epochs over the corpus (the limit when --max_steps is set).")
    a(
        "--max_steps",
        type=int,
        default=d("max_steps"),
        help="Stop after this many optimizer steps (-1: n_epoch epochs; else > 0).",
    )
    a("--batch_size", type=int, default=d("batch_size"), help="Sequences per process per micro-batch.")
    a(
        "--group_by_size",
        dest="group_by_size",
        action="store_true",
        default=d("group_by_size"),
        help="Batch sequences of similar length.",
    )
    a("--no_group_by_size", dest="group_by_size", action="store_false", help="Turn length grouping off.")
    a(
        "--gradient_accumulation_steps",
        type=int,
        default=d("gradient_accumulation_steps"),
        help="Micro-batches per optimizer step.",
    )
    a("--warmup_prop", default=d("warmup_prop"), type=float, help="Share of the steps with linear warm-up.")
    a("--weight_decay", default=d("weight_decay"), type=float, help="AdamW weight decay (not on biases and norms).")
    a(
        "--learning_rate",
        default=d("learning_rate"),
        type=float,
        help="Peak learning rate of the linear schedule (a new value on --resume applies from there on).",
    )
    a("--adam_epsilon", default=d("adam_epsilon"), type=float, help="AdamW epsilon.")
    a("--max_grad_norm", default=d("max_grad_norm"), type=float, help="Gradient norm clipping threshold.")
    a("--initializer_range", default=0.02, type=float, help="Std of the student's random init.")
    a("--skip_nonfinite_loss", action="store_true", help="Skip a step whose loss is NaN/inf instead of stopping.")

    a("--fp16", action="store_true", help="Mixed precision float16 (torch.amp + GradScaler).")
    a("--fp16_opt_level", type=str, default="O1", help="Accepted for compatibility; apex levels map to --fp16.")
    a("--bf16", action="store_true", help="Mixed precision bfloat16 (torch.amp).")
    a(
        "--tf32",
        action="store_true",
        help="Let float32 matmuls and convolutions use TF32 on Ampere and newer GPUs (faster, ~10 mantissa bits); "
        "off keeps exact float32.",
    )
    a(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="Seconds a collective waits for the other processes (e.g. while rank 0 writes a large checkpoint) "
        "before the run fails.",
    )
    a("--n_gpu", type=int, default=1, help="GPUs per node; 0 runs on CPU.")
    a("--local_rank", "--local-rank", type=int, default=-1, help="Set by the launcher.")
    a("--num_workers", type=int, default=d("num_workers"), help="DataLoader worker processes.")
    a("--seed", type=int, default=d("seed"), help="Seeds python, numpy and torch; dual pairing and draws follow.")
    a(
        "--log_interval",
        type=int,
        default=d("log_interval"),
        help="Micro-batches between TensorBoard logs and a console loss line.",
    )
    a(
        "--checkpoint_interval",
        type=int,
        default=d("checkpoint_interval"),
        help="Micro-batches between checkpoints: the training state, checkpoint.pth and a checkpoint-<step>/ "
        "model folder.",
    )
    a(
        "--save_total_limit",
        type=int,
        default=d("save_total_limit"),
        help="Full training states kept in checkpoints/, and checkpoint-<step>/ model folders kept.",
    )
    a(
        "--is_wandb",
        action="store_true",
        help="Also log the TensorBoard scalars to Weights & Biases (needs the wandb package); the wandb run is "
        "named after the run folder.",
    )
    a("--wandb_project", type=str, default="Causal-BERT-Distillation", help="Weights & Biases project (--is_wandb).")
    for action in p._actions:
        action.help = action.help or TYPE_HELP.get(action.dest)
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in --help, and the example epilog kept as written."""


def sanity_checks(args: argparse.Namespace) -> None:
    """The original's asserts, as errors that say what to change."""
    if args.parallel_crossway:
        raise UserError(
            "--parallel_crossway was abandoned in the original and is not supported; use --include_crossway"
        )
    if args.resume and args.force:
        raise UserError("choose one of --resume (continue the run) and --force (replace it)")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max_steps must be > 0, or -1 for --n_epoch epochs; got {args.max_steps}")
    if args.fp16 and args.bf16:
        raise UserError("choose one of --fp16 and --bf16")
    alphas = {k: getattr(args, f"alpha_{k}") for k in ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")}
    negative = [k for k, v in alphas.items() if v < 0]
    if negative:
        raise UserError(f"alphas must be >= 0: --alpha_{negative[0]} is {alphas[negative[0]]}")
    if sum(alphas.values()) <= 0:
        raise UserError("all alphas are 0: nothing to train")
    if args.mlm and (args.alpha_mlm <= 0 or args.alpha_clm != 0):
        raise UserError("with --mlm, --alpha_mlm must be > 0 and --alpha_clm 0")
    if not args.mlm and (args.alpha_clm <= 0 or args.alpha_mlm != 0):
        raise UserError("without --mlm, --alpha_clm must be > 0 and --alpha_mlm 0")
    if args.mlm:
        if args.token_counts is None:
            raise UserError("--mlm needs --token_counts")
    check_student_teacher(args.student_type, args.teacher_type, args.mlm)
    student_row = ARCHITECTURES[args.student_type]
    if args.freeze_token_type_embds and student_row.token_type_embeddings is None:
        raise UserError(
            f"--freeze_token_type_embds does not apply to a {args.student_type} student "
            "(it has no token type embeddings)"
        )
    if args.freeze_pos_embs and student_row.position_embeddings is None:
        raise UserError(
            f"--freeze_pos_embs does not apply to a {args.student_type} student "
            f"({student_row.position_kind} positions have no table)"
        )
    causal = args.alpha_causal_ce > 0 or args.alpha_causal_cos > 0
    if causal and not args.data_augment and args.neuron_mapping is None:
        raise UserError("causal losses need --neuron_mapping (or --data_augment)")
    if args.interchange_consecutive_only and args.interchange_masked_token_only:
        raise UserError("choose one of --interchange_consecutive_only and --interchange_masked_token_only")
    if args.interchange_masked_token_only and not args.mlm:
        raise UserError("--interchange_masked_token_only needs --mlm")
    if not 0 <= args.interchange_prop <= 1:
        raise UserError(f"--interchange_prop must be in [0, 1], got {args.interchange_prop}")
    for name in (
        "batch_size",
        "gradient_accumulation_steps",
        "n_epoch",
        "log_interval",
        "checkpoint_interval",
        "save_total_limit",
    ):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_numeric_flags(args)
    if abs(args.word_mask + args.word_keep + args.word_rand - 1) > 1e-6:
        raise UserError("--word_mask + --word_keep + --word_rand must sum to 1")
    require_file(args.student_config, "student config")
    check_student_config(args.student_config, args.student_type)
    check_teacher_folder(args.teacher_name)
    require_file(args.data_file, "data file")
    if args.token_counts is not None:
        require_file(args.token_counts, "token counts file")
    if args.student_pretrained_weights is not None:
        require_file(args.student_pretrained_weights, "student pretrained weights")
    if args.neuron_mapping is not None:
        require_file(args.neuron_mapping, "neuron mapping")


# Flag -> (lowest, highest, whether the bounds themselves are allowed) of the numeric flags whose
# impossible values would otherwise show up later as another problem (a temperature of 0 as a
# non-finite loss, a negative learning rate as a diverging run).
FLAG_RANGES = {
    "temperature": (0, None, False),
    "learning_rate": (0, None, True),
    "adam_epsilon": (0, None, True),
    "weight_decay": (0, None, True),
    "max_grad_norm": (0, None, False),
    "warmup_prop": (0, 1, True),
    "word_mask": (0, 1, True),
    "word_keep": (0, 1, True),
    "word_rand": (0, 1, True),
    "initializer_range": (0, None, True),
    "num_workers": (0, None, True),
}


def check_numeric_flags(args: argparse.Namespace) -> None:
    """Refuse numeric flags outside the values they can take (UserError naming the flag and value)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name, (low, high, inclusive) in FLAG_RANGES.items():
        value = getattr(args, name)
        below = value < low if inclusive else value <= low
        above = high is not None and value > high
        if below or above:
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}" if inclusive else f"> {low}"
            raise UserError(f"--{name} must be {bounds}, got {value}")
    if not 0 < args.mlm_mask_prop <= 1:
        raise UserError(f"--mlm_mask_prop must be in (0, 1], got {args.mlm_mask_prop}")
    if args.interchange_max_token == 0 or args.interchange_max_token < -1:
        raise UserError(f"--interchange_max_token must be >= 1, or -1 for no cap; got {args.interchange_max_token}")


def init_distributed(args: argparse.Namespace) -> RunContext:
    """This process's rank, world size and device, from the launcher's environment.

    torchrun sets WORLD_SIZE, RANK, LOCAL_RANK; torch.distributed.launch passes --local-rank and
    the original recipe also set N_GPU_NODE / N_NODES / NODE_RANK. Either way works.
    """
    refuse_bare_slurm_tasks(os.environ)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    global_rank = int(os.environ.get("RANK", 0))
    local_rank = args.local_rank if args.local_rank != -1 else int(os.environ.get("LOCAL_RANK", 0))
    multi_process, is_master = world_size > 1, global_rank == 0
    if not is_master:  # only rank 0 reports progress; warnings still come from every rank
        logging.getLogger().setLevel(logging.WARNING)
        transformers.utils.logging.disable_progress_bar()
    use_cuda = args.n_gpu > 0 and torch.cuda.is_available()
    if args.n_gpu > 0 and not use_cuda and is_master:
        warnings.warn("no CUDA device found: training on CPU", stacklevel=1)
        logger.warning("No CUDA device found: training on CPU (pass --n_gpu 0 to silence this).")
    if args.n_gpu > 1 and not multi_process and use_cuda:
        raise UserError(
            f"--n_gpu {args.n_gpu} needs one process per GPU: launch with "
            f"`torchrun --nproc_per_node {args.n_gpu} causal_train.py ...`"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if multi_process and not dist.is_initialized():
        # Rendezvous from the launcher's MASTER_ADDR / MASTER_PORT (torchrun sets them on every node).
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.ddp_timeout))
    return RunContext(global_rank=global_rank, local_rank=local_rank, world_size=world_size, device=device)


def refuse_bare_slurm_tasks(env: Mapping[str, str]) -> None:
    """Refuse several SLURM tasks started without a launcher (`srun python causal_train.py`).

    Without WORLD_SIZE / RANK each task would train alone as rank 0 into the same run folder (and
    with --force delete the others' files). Reading SLURM's ranks would also need MASTER_ADDR,
    which SLURM does not set: torchrun does all of it.
    """
    if "WORLD_SIZE" in env:
        return
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if tasks.isdigit() and int(tasks) > 1:
        raise UserError(
            f"SLURM started {tasks} tasks of causal_train.py without a launcher (WORLD_SIZE and RANK are unset), "
            "so each would train alone as rank 0 into the same folder: launch one torchrun per node, e.g. "
            "`srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES --nproc_per_node N --rdzv_backend c10d "
            "--rdzv_endpoint $MASTER_ADDR:29500 causal_train.py ...`"
        )


def cluster_checks(args: argparse.Namespace) -> None:
    """Checks of the launch, precision and logging flags (before any work)."""
    if args.ddp_timeout < 1:
        raise UserError(f"--ddp_timeout must be >= 1 (seconds), got {args.ddp_timeout}")
    if args.is_wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("--is_wandb: the wandb package is not installed (pip install wandb), or drop --is_wandb")
    if args.interchange_mlm:
        logger.warning("--interchange_mlm has no effect: the original accepted it and never used it")


def set_precision_backends(args: argparse.Namespace) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions only with --tf32 (exact float32 otherwise)."""
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = args.tf32


def teacher_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The teacher's weight dtype: None (float32) without --teacher_fp16, else the autocast dtype.

    Under --bf16 bfloat16, under --fp16 float16: the teacher then runs in the dtype the autocast
    region computes in (a bfloat16 teacher under float16 autocast fails in LayerNorm on CPU).
    Without mixed precision: float16 on GPU, bfloat16 on CPU (float16 matmuls are slow there).
    """
    if not args.teacher_fp16:
        return None
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def warn_pickle_in_multi_process(data_file: str, context: RunContext) -> bool:
    """Warn (rank 0) that every process of a multi-process run unpickles a whole pickle corpus."""
    if not (context.multi_process and Path(data_file).suffix in PICKLE_SUFFIXES):
        return False
    if context.is_master:
        logger.warning(
            "%s is a pickle: each of the %d processes unpickles the whole corpus into its own memory; convert it "
            "once with `python scripts/binarized_data.py ... --format memmap` and pass the .tokens.npy file, "
            "which all processes share",
            data_file,
            context.world_size,
        )
    return True


def start_wandb(args: argparse.Namespace, description: dict):
    """A Weights & Biases run (rank 0) named after the run folder, with the run's parameters as config."""
    import wandb

    return wandb.init(
        project=args.wandb_project,
        name=description["run"]["run_name"],
        config=json.loads(json.dumps(description, default=str)),
    )


def default_run_name(args: argparse.Namespace, world_size: int) -> str:
    data = Path(args.data_file).name.split(".")[0]
    nm = Path(args.neuron_mapping).stem if args.neuron_mapping else "none"
    mode = "consec" if args.interchange_consecutive_only else "masked" if args.interchange_masked_token_only else "rand"
    return (
        f"s_{args.student_type}_t_{args.teacher_type}_data_{data}_seed_{args.seed}_mlm_{args.mlm}"
        f"_ce_{args.alpha_ce}_mlm_{args.alpha_mlm}_clm_{args.alpha_clm}_mse_{args.alpha_mse}_cos_{args.alpha_cos}"
        f"_causal-ce_{args.alpha_causal_ce}_causal-cos_{args.alpha_causal_cos}_nm_{nm}"
        f"_int-prop_{args.interchange_prop}_int-max_{args.interchange_max_token}_int-{mode}"
        f"_aug_{args.data_augment}_crossway_{args.include_crossway}"
        f"_eff-bs_{args.batch_size * args.gradient_accumulation_steps * world_size}"
    )


# Written first into every run folder: what lets --force recognise a folder as a previous run.
RUN_MARKER = ".causal_train_run"
RUN_MARKER_TEXT = "A run folder of causal_train.py (DIITO). --force may replace it.\n"
# What a run folder of this code holds; a folder made before the marker existed is recognised when
# its parameters.json has the training flags and it holds nothing else.
RUN_FILES = (
    "parameters.json",
    "git_log.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "checkpoint.pth",
    "model_epoch_*.pth",
    "checkpoints",
    "log",
    RUN_MARKER,
)
RUN_PARAMETER_KEYS = ("student_type", "teacher_type", "teacher_name", "data_file", "dump_path", "alpha_ce")


def on_master(context: RunContext, check: Callable[[], None]) -> None:
    """Run `check` on rank 0 alone and raise its UserError on every rank.

    Checking on every rank would race with rank 0 creating or emptying the run folder.
    """
    problem = None
    if context.is_master:
        try:
            check()
        except UserError as e:
            problem = str(e)
    if context.multi_process:
        outcome = [problem]
        dist.broadcast_object_list(outcome, src=0)  # also a barrier: past it, rank 0 is done
        problem = outcome[0]
    if problem is not None:
        raise UserError(problem)


def check_run_dir(path: Path, args: argparse.Namespace) -> None:
    """Refuse, before any work, a run folder that this run could not create, continue or replace."""
    if args.resume and not path.is_dir():
        raise UserError(f"--resume: {path} does not exist")
    if path.exists() and not args.resume:
        if not args.force:
            raise UserError(f"{path} already exists: pass --force to overwrite it or --resume to continue it")
        if not is_previous_run(path):
            raise UserError(
                f"--force refuses to delete {path}: it is not a run's dump (no {RUN_MARKER} written by causal_train.py)"
            )
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"--dump_path: {existing} is not a folder")
    problem = cannot_write_in(existing)
    if problem is not None:
        raise UserError(f"--dump_path: cannot write in {existing} ({problem})")


def is_previous_run(path: Path) -> bool:
    """Whether `path` is a run folder this code wrote: it holds the marker, or (older runs) a
    parameters.json with the training flags and nothing but the files a run writes."""
    if not path.is_dir():
        return False
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            return marker.read_text() == RUN_MARKER_TEXT
        except (OSError, UnicodeDecodeError):
            return False
    try:
        params = json.loads((path / "parameters.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(params, dict) or not all(k in params for k in RUN_PARAMETER_KEYS):
        return False
    return all(any(fnmatch.fnmatch(p.name, pattern) for pattern in RUN_FILES) for p in path.iterdir())


def prepare_dump_path(path: Path, args: argparse.Namespace, context: RunContext) -> None:
    """Create the run folder (new, or replacing a previous run with --force), or keep it (--resume)."""
    on_master(context, lambda: _claim_dump_path(path, args))


def _claim_dump_path(path: Path, args: argparse.Namespace) -> None:
    check_run_dir(path, args)  # again: the folder may have changed while the models loaded
    if args.resume:
        return
    if path.exists():
        logger.info("Overwriting %s (--force)", path)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / RUN_MARKER).write_text(RUN_MARKER_TEXT)


def git_log() -> dict:
    """Repository id, commit and branch of the code that runs (recorded, not required): the
    repository this file lives in, wherever the run folder is."""
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        try:
            branch = str(repo.active_branch)
        except TypeError:
            branch = "(detached HEAD)"
        return {"repo_id": str(repo), "repo_sha": str(repo.head.object.hexsha), "repo_branch": branch}
    except Exception as e:  # no git executable, not a repository, empty repository...
        return {"repo_id": None, "repo_sha": None, "repo_branch": None, "error": f"{type(e).__name__}: {e}"}


# Size settings every family names (through its config's attribute_map: DistilBERT's `dim`, GPT-2's
# `n_embd`...), plus the families' own names for the feed-forward width.
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "max_position_embeddings",
    "intermediate_size",
    "num_key_value_heads",
    "head_dim",
    "hidden_dim",
    "n_inner",
)
# Sizes a config may leave null: the model derives them (GPT-2's 4 * n_embd, Llama's hidden / heads).
DERIVED_SIZES = ("n_inner", "head_dim", "num_key_value_heads")
# Keys a saved config carries that are no setting (written by save_pretrained, or by the original's configs).
BOOKKEEPING_KEYS = ("transformers_version", "architectures", "_name_or_path", "tie_weights_")


def check_student_config(path: str, student_type: str):
    """The student's `transformers` config from its file; UserError (naming the file and the key) unless
    it makes a `student_type` model: a JSON object whose model_type (if any) is the student type,
    every known setting of its default's type, sizes positive and consistent, no other family's setting."""
    try:
        raw = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise UserError(f"student config {path} is not JSON text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"student config {path} is not JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read student config {path}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise UserError(f"student config {path} must be a JSON object of settings, not a {type(raw).__name__}")
    model_type = raw.get("model_type", student_type)
    if model_type != student_type:
        raise UserError(f"student config {path} has model_type {model_type!r}, but --student_type is {student_type}")
    config_class = ARCHITECTURES[student_type].config_cls()
    default = config_class()
    known = default.to_dict()
    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    settings = {aliases.get(k, k): v for k, v in raw.items()}
    for key, value in settings.items():
        expected = type(known.get(key))
        ok = {
            int: type(value) is int,
            bool: type(value) is bool,
            float: isinstance(value, (int, float)) and type(value) is not bool,
        }.get(expected, True)
        if value is not None and not ok:
            raise UserError(f"student config {path}: {key!r} must be {expected.__name__}, got {value!r}")
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, (int, float)) and not 0 <= value <= 1:
            raise UserError(f"student config {path}: {key!r} must be in [0, 1], got {value!r}")
    try:
        config = config_class.from_dict(raw)
    except (TypeError, ValueError, KeyError, StrictDataclassError) as e:  # transformers' own validation
        raise UserError(f"student config {path}: {_one_line(e)}") from None
    sizes = [aliases.get(k, k) for k in SIZE_KEYS if aliases.get(k, k) in known]
    for key in sizes:
        value = getattr(config, key)
        if value is None and key in DERIVED_SIZES:
            continue
        if type(value) is not int or value < 1:
            raise UserError(f"student config {path}: {key!r} must be a positive integer, got {value!r}")
    hidden, heads = (aliases.get(k, k) for k in ("hidden_size", "num_attention_heads"))
    h, n = getattr(config, hidden), getattr(config, heads)
    head_dim = getattr(config, "head_dim", None)
    if h % n and head_dim in (None, h // n):  # a head width derived from the hidden size must divide it
        raise UserError(f"student config {path}: {hidden!r} {h} is not divisible by {heads!r} {n}")
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None and n % kv:
        raise UserError(f"student config {path}: {heads!r} {n} is not divisible by 'num_key_value_heads' {kv}")
    others = {k for row in ARCHITECTURES.values() if row.name != student_type for k in _config_keys(row)}
    # A key the config neither knows nor converts (a legacy name such as Llama's rope_theta) stays a
    # plain attribute that no model reads.
    kept = config.to_dict()
    unknown = [
        k
        for k in raw
        if aliases.get(k, k) not in known and k not in aliases and k in kept and k not in BOOKKEEPING_KEYS
    ]
    foreign = [k for k in unknown if k in others]
    if foreign:
        raise UserError(
            f"student config {path}: {foreign[0]!r} is not a {student_type} setting (it would be ignored); "
            f"the {student_type} sizes are {', '.join(sizes)}"
        )
    if unknown:
        logger.warning(
            "Student config %s: %s not %s settings (ignored)", path, ", ".join(map(repr, unknown)), student_type
        )
    return config


def _config_keys(row) -> set[str]:
    """Every setting name (and alias) of a family's config."""
    config_class = row.config_cls()
    return set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}) or {})


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' validation errors span several)."""
    return " ".join(str(e).split()) or type(e).__name__


# Files one of which a model folder's tokenizer needs (fast, WordPiece, BPE or SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _is_local_path(name: str) -> bool:
    """Whether --teacher_name names a folder rather than a Hub id (`name` or `org/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/") or os.path.exists(name)


def check_teacher_folder(name: str) -> None:
    """Refuse a local teacher that is not a model folder with a config and a tokenizer (no loading)."""
    if not _is_local_path(name):
        return
    folder = Path(name).expanduser()
    if not folder.exists():
        raise UserError(f"--teacher_name: the folder {name} does not exist (a Hub id is `name` or `org/name`)")
    if not folder.is_dir():
        raise UserError(f"--teacher_name: {folder} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"--teacher_name: {folder} has no config.json (save the teacher with save_pretrained)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"--teacher_name: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...): "
            "save the teacher's tokenizer into it with tokenizer.save_pretrained"
        )


def load_teacher(args: argparse.Namespace):
    """The teacher's tokenizer and LM, refused unless every weight of the LM (its head included) was trained."""
    check_teacher_folder(args.teacher_name)
    row = ARCHITECTURES[args.teacher_type]
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.teacher_name, cache_dir=args.cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the tokenizer of teacher {args.teacher_name!r}: {str(e).splitlines()[0]}"
        ) from None
    try:
        teacher, info = row.lm_cls().from_pretrained(
            args.teacher_name, cache_dir=args.cache_dir, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load teacher {args.teacher_name!r}: {str(e).splitlines()[0]}") from None
    if teacher.config.model_type != args.teacher_type:
        raise UserError(
            f"--teacher_name {args.teacher_name} is a {teacher.config.model_type}, not a {args.teacher_type}"
        )
    tied = _tied_sources(teacher)
    missing = sorted(k for k in info["missing_keys"] if k not in tied or tied[k] in info["missing_keys"])
    head = [k for k in missing if not k.startswith(row.backbone + ".")]
    if head:
        raise UserError(
            f"teacher {args.teacher_name} has no trained LM head (missing {', '.join(head[:3])}"
            f"{'...' if len(head) > 3 else ''}): a bare encoder is not a teacher; see scripts/fit_mlm_head.py"
        )
    if missing:
        raise UserError(
            f"teacher {args.teacher_name} lacks {len(missing)} weights (e.g. {missing[0]}): they would be random"
        )
    return tokenizer, teacher


def _tied_sources(model) -> dict[str, str]:
    """Tied parameter name -> the name it shares its tensor with (a tied copy is never saved)."""
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return dict(keys) if isinstance(keys, dict) else {k: k for k in keys}


def load_student(args: argparse.Namespace, teacher_config):
    """A student built from --student_config (and --student_pretrained_weights), sized for the teacher."""
    row = ARCHITECTURES[args.student_type]
    config = check_student_config(args.student_config, args.student_type)
    config.output_hidden_states = False
    if row.init_range_from_flag:
        config.initializer_range = args.initializer_range
    try:
        student = row.lm_cls()(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"student config {args.student_config}: cannot build a {args.student_type}: {_one_line(e)}"
        ) from None
    if args.student_pretrained_weights is not None:
        load_student_weights(student, args.student_pretrained_weights, args.student_type)
    s_vocab, t_vocab = student.config.vocab_size, teacher_config.vocab_size
    if s_vocab != t_vocab:
        raise UserError(f"student vocab size {s_vocab} != teacher vocab size {t_vocab}")
    if max_positions(student.config) < max_positions(teacher_config):
        raise UserError(
            f"student accepts {max_positions(student.config)} positions, teacher {max_positions(teacher_config)}"
        )
    return student


def load_student_weights(student, path: str, student_type: str) -> None:
    """Load a state dict (read without running code) into `student`; UserError for a file that is not
    one, or a tensor whose shape differs from the student's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(
                f"refused student weights {path}: it holds objects a state dict never has "
                "(tampered, or not a state dict); nothing in it was run"
            ) from None
        raise UserError(f"cannot read student weights {path}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated zip, bad CRC, empty or foreign bytes
        raise UserError(
            f"cannot read student weights {path} (truncated or not a torch file): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"student weights {path} is not a state dict (a dict of parameter name -> tensor)")
    own = student.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"student weights {path}: {key} has shape {tuple(tensor.shape)}, the student's "
                f"(--student_config) {tuple(own[key].shape)}"
            )
    result = student.load_state_dict(state, strict=False)
    loaded = set(state) - set(result.unexpected_keys)
    if not loaded:
        raise UserError(f"none of the weights in {path} match a {student_type} student (e.g. {next(iter(state), '?')})")
    missing = [k for k in result.missing_keys if k not in _tied_sources(student)]
    if missing or result.unexpected_keys:
        logger.warning(
            "Student weights: %d missing (%s...), %d unexpected", len(missing), missing[:3], len(result.unexpected_keys)
        )


def token_probabilities(args: argparse.Namespace, vocab_size: int, special_ids: dict[str, int]) -> torch.Tensor:
    """(vocab,) MLM target weights: max(count, 1) ** -mlm_smoothing, special tokens 0."""
    counts = masking.load_token_counts(args.token_counts, vocab_size)
    return masking.token_probabilities(counts, args.mlm_smoothing, special_ids.values())


def freeze_embeddings(student, args: argparse.Namespace) -> None:
    row = ARCHITECTURES[args.student_type]
    for flag, path in (
        ("freeze_pos_embs", row.position_embeddings),
        ("freeze_token_type_embds", row.token_type_embeddings),
    ):
        if getattr(args, flag):
            student.get_submodule(path).weight.requires_grad = False


def write_run_info(args: argparse.Namespace, context: RunContext, student) -> None:
    """parameters.json (the arguments as given, and what the run derived from them), git_log.json and
    config.json of the run (rank 0)."""
    if context.is_master:
        write_json(run_description(args, context), context.run_dir / "parameters.json")
        write_json(git_log(), context.run_dir / "git_log.json")
        student.config.to_json_file(str(context.run_dir / "config.json"))


def run_description(args: argparse.Namespace, context: RunContext) -> dict:
    """Every argument as the user gave it, plus `run`: the context the run derived from them."""
    return {**vars(args), "run": {"run_name": context.run_dir.name, **context.describe()}}


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the run folder.

    A run stopped by SIGTERM / SIGINT saves its state and exits with 128 + the signal's number
    (143 / 130), the status the signal itself would have given, so `train && evaluate` stops
    there and a requeue script knows to relaunch with --resume.
    """
    args = build_parser().parse_args(argv)
    sanity_checks(args)
    cluster_checks(args)
    set_precision_backends(args)
    context = init_distributed(args)
    try:
        return train(args, context)
    finally:
        if context.multi_process and dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, context: RunContext) -> Path:
    """Data, teacher, student, distiller, training: everything after the launcher's set-up."""
    config = TrainingConfig.from_args(args)
    run_dir = Path(args.dump_path) / (args.run_name or default_run_name(args, context.world_size))
    on_master(context, lambda: check_run_dir(run_dir, args))  # before the long work, nothing written
    set_seed(args.seed)
    if args.fp16 and args.fp16_opt_level != "O1" and context.is_master:
        logger.info("--fp16_opt_level %s: torch.amp has one mixed-precision mode, apex's O1", args.fp16_opt_level)

    tokenizer, teacher = load_teacher(args)
    special_ids = special_token_ids(tokenizer)
    context = replace(
        context, special_token_ids=special_ids, max_model_input_size=max_positions(teacher.config), run_dir=run_dir
    )
    student = load_student(args, teacher.config)
    if (args.alpha_cos > 0 or args.alpha_causal_cos > 0) and cf.hidden_size(student) != cf.hidden_size(teacher):
        raise UserError(
            f"cos losses need equal hidden sizes: student {cf.hidden_size(student)}, teacher {cf.hidden_size(teacher)}"
        )
    mapping = None
    if (args.alpha_causal_ce > 0 or args.alpha_causal_cos > 0) and not args.data_augment:
        mapping = cf.load_neuron_mapping(args.neuron_mapping)
        cf.validate_neuron_mapping(mapping, teacher.config, student.config, path=args.neuron_mapping)

    token_probs = token_probabilities(args, teacher.config.vocab_size, special_ids) if args.mlm else None
    warn_pickle_in_multi_process(args.data_file, context)
    store = load_sequences(args.data_file)
    check_vocab_range(store, teacher.config.vocab_size, args.data_file)
    dataset = LmSeqsDataset(
        DatasetParams(context.max_model_input_size, args.mlm, special_ids, seed=args.seed, family=args.teacher_type),
        store,
    )

    prepare_dump_path(run_dir, args, context)
    if not args.resume:  # at once, beside the marker: the folder is one --force may replace
        write_run_info(args, context, student)
    if context.is_master:  # evaluation scripts then need no --tokenizer_name
        tokenizer.save_pretrained(run_dir)

    freeze_embeddings(student, args)
    device = context.device
    student.to(device)
    dtype = teacher_dtype(args, device)
    if dtype is not None and context.is_master:
        logger.info("--teacher_fp16: the teacher is kept in %s", str(dtype).removeprefix("torch."))
    teacher.to(device, dtype=dtype)
    for p in teacher.parameters():
        p.requires_grad = False

    # Every rank built the same student from the same seed (DDP also broadcasts rank 0's weights);
    # from here on each rank draws its own dropout masks instead of the same ones on different data.
    torch.manual_seed(config.seed + context.global_rank)
    description = run_description(args, context)
    distiller = CausalDistiller(
        config,
        context,
        dataset,
        token_probs,
        student,
        teacher,
        mapping,
        run_description=description,
        tokenizer=tokenizer,
        # Started by train(): after a resume, once the state is accepted.
        start_wandb=(lambda: start_wandb(args, description)) if args.is_wandb and context.is_master else None,
    )
    if args.resume:
        distiller.resume()
        write_run_info(args, context, student)  # only once the state is accepted, as this run's settings
    try:
        stopped_by = distiller.train()
    except StopTraining as e:
        raise UserError(str(e)) from None
    except (OSError, SafetensorError) as e:  # the final save_pretrained (states and .pth files: save_atomically)
        raise UserError(
            f"cannot write the student into {run_dir}: {_one_line(e)}; what was there before is kept"
        ) from None
    if stopped_by is not None:
        raise SystemExit(128 + (signal.SIGINT if stopped_by == "SIGINT" else signal.SIGTERM))
    return run_dir


if __name__ == "__main__":
    run_cli(main)
