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

This file is the CLI: the parser, the checks of the flags, the launcher's set-up and `train()`.
The flags are declared in `training_config.py`, the run folder is `run_folders.py`'s, and the
teacher and student are loaded (and checked) by `model_loading.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import signal
import typing
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors import SafetensorError

import masking
import rank_faults
import sharding
from architectures import ARCHITECTURES, check_student_teacher, hidden_size, max_positions, special_token_ids
from causal_distiller import CausalDistiller
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from model_loading import (
    check_resumed_student,
    check_student_config,
    check_teacher_folder,
    freeze_embeddings,
    load_student,
    load_teacher,
    teacher_dtype,
)
from neuron_mapping import load_neuron_mapping, validate_neuron_mapping
from optimization import StopTraining
from run_folders import (
    check_run_dir,
    default_run_name,
    on_master,
    prepare_dump_path,
    release_run_locks,
    run_description,
    run_finished,
    write_run_info,
)
from token_store import PICKLE_SUFFIXES, check_vocab_range, load_sequences
from training_config import RunContext, RunOptions, TrainingConfig, flag_values
from utils import AbortRun, UserError, check_seed, one_line, require_file, run_cli, set_seed

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


def build_parser() -> argparse.ArgumentParser:
    """The training CLI: one flag per field of `RunOptions`, then of `TrainingConfig`, in field order.

    Each field holds its flag's default and help (training_config.py); a field without a default
    is a required flag.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLE, formatter_class=_HelpFormatter)
    for cls in (RunOptions, TrainingConfig):
        hints = typing.get_type_hints(cls)  # the annotations are strings (`from __future__ import annotations`)
        for f in dataclasses.fields(cls):
            _add_flag(p, f, hints[f.name])
    return p


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: typing.Any) -> None:
    """`--<name>` for field `f` of annotation `hint`: a bool is a store_true flag (and, when on by
    default, also `--no_<name>` to turn it off); any other type, `str | None` included, takes a value."""
    meta = f.metadata
    flags = [f"--{f.name}", *meta.get("aliases", ())]
    if hint is bool:
        parser.add_argument(*flags, action="store_true", default=f.default, help=meta["help"])
        if f.default:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=meta["negation_help"])
        return
    value_type = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    required = f.default is dataclasses.MISSING
    parser.add_argument(
        *flags,
        type=value_type,
        default=None if required else f.default,
        required=required,
        choices=meta.get("choices"),
        help=meta["help"],
    )


def parse_args(argv: list[str] | None = None) -> tuple[TrainingConfig, RunOptions]:
    """The command line as the two dataclasses that declare its flags (no Namespace goes further)."""
    values = vars(build_parser().parse_args(argv))
    config = TrainingConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainingConfig)})
    options = RunOptions(**{f.name: values[f.name] for f in dataclasses.fields(RunOptions)})
    return config, options


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in --help, and the example epilog kept as written."""


def sanity_checks(config: TrainingConfig, options: RunOptions) -> None:
    """The original's asserts, as errors that say what to change."""
    if options.parallel_crossway:
        raise UserError(
            "--parallel_crossway was abandoned in the original and is not supported; use --include_crossway"
        )
    if options.resume and options.force:
        raise UserError("choose one of --resume (continue the run) and --force (replace it)")
    if config.max_steps == 0 or config.max_steps < -1:
        raise UserError(f"--max_steps must be > 0, or -1 for --n_epoch epochs; got {config.max_steps}")
    if config.fp16 and config.bf16:
        raise UserError("choose one of --fp16 and --bf16")
    alphas = config.alphas
    negative = [k for k, v in alphas.items() if v < 0]
    if negative:
        raise UserError(f"alphas must be >= 0: --alpha_{negative[0]} is {alphas[negative[0]]}")
    if sum(alphas.values()) <= 0:
        raise UserError("all alphas are 0: nothing to train")
    if config.mlm and (config.alpha_mlm <= 0 or config.alpha_clm != 0):
        raise UserError("with --mlm, --alpha_mlm must be > 0 and --alpha_clm 0")
    if not config.mlm and (config.alpha_clm <= 0 or config.alpha_mlm != 0):
        raise UserError("without --mlm, --alpha_clm must be > 0 and --alpha_mlm 0")
    if config.mlm:
        if options.token_counts is None:
            raise UserError("--mlm needs --token_counts")
    check_student_teacher(options.student_type, options.teacher_type, config.mlm)
    student_row = ARCHITECTURES[options.student_type]
    if options.freeze_token_type_embds and student_row.token_type_embeddings is None:
        raise UserError(
            f"--freeze_token_type_embds does not apply to a {options.student_type} student "
            "(it has no token type embeddings)"
        )
    if options.freeze_pos_embs and student_row.position_embeddings is None:
        raise UserError(
            f"--freeze_pos_embs does not apply to a {options.student_type} student "
            f"({student_row.position_kind} positions have no table)"
        )
    if config.causal and not config.data_augment and options.neuron_mapping is None:
        raise UserError("causal losses need --neuron_mapping (or --data_augment)")
    if config.interchange_consecutive_only and config.interchange_masked_token_only:
        raise UserError("choose one of --interchange_consecutive_only and --interchange_masked_token_only")
    if config.interchange_masked_token_only and not config.mlm:
        raise UserError("--interchange_masked_token_only needs --mlm")
    if config.restrict_ce_to_mask and not config.mlm:
        raise UserError("--restrict_ce_to_mask needs --mlm (without it there are no MLM targets to restrict to)")
    if not 0 <= config.interchange_prop <= 1:
        raise UserError(f"--interchange_prop must be in [0, 1], got {config.interchange_prop}")
    check_interchange_flags(config)
    for name in (
        "batch_size",
        "gradient_accumulation_steps",
        "n_epoch",
        "log_interval",
        "checkpoint_interval",
        "save_total_limit",
    ):
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(config, name)}")
    check_numeric_flags(config, options)
    check_seed(config.seed, "--seed")
    if abs(config.word_mask + config.word_keep + config.word_rand - 1) > 1e-6:
        raise UserError("--word_mask + --word_keep + --word_rand must sum to 1")
    require_file(options.student_config, "student config")
    check_student_config(options.student_config, options.student_type)
    check_teacher_folder(options.teacher_name, options.teacher_type)
    require_file(options.data_file, "data file")
    if options.token_counts is not None:
        require_file(options.token_counts, "token counts file")
    if options.student_pretrained_weights is not None:
        require_file(options.student_pretrained_weights, "student pretrained weights")
    if options.neuron_mapping is not None:
        require_file(options.neuron_mapping, "neuron mapping")


def check_interchange_flags(config: TrainingConfig) -> None:
    """Refuse interchange settings that would make a causal loss train nothing, or that the run would ignore.

    --interchange_masked_token_only interchanges every MLM target: --interchange_prop and
    --interchange_max_token do not apply to it. Otherwise --interchange_prop 0 interchanges no position.
    """
    if config.interchange_masked_token_only:
        if config.interchange_max_token != -1:
            raise UserError(
                "--interchange_max_token does not apply with --interchange_masked_token_only (every MLM target "
                "is interchanged): drop one of them"
            )
        return
    if config.causal and config.interchange_prop == 0:
        raise UserError(
            "--interchange_prop 0 interchanges no position, so the causal losses (--alpha_causal_ce, "
            "--alpha_causal_cos) would train nothing: give --interchange_prop > 0, or set those alphas to 0"
        )


def check_interchange_reaches(config: TrainingConfig, lengths, max_input: int, data_file: str) -> None:
    """Refuse an --interchange_prop too small to interchange a position of even the longest sequence of
    the corpus (`lengths`, cut to the teacher's `max_input` tokens): the causal losses would train nothing."""
    if not config.causal or config.interchange_masked_token_only or len(lengths) == 0:
        return
    longest = torch.tensor([min(int(lengths.max()), max_input)])
    if int(masking.interchange_counts(longest, longest, config.interchange_prop, config.interchange_max_token)) == 0:
        raise UserError(
            f"--interchange_prop {config.interchange_prop} interchanges no position: the longest sequence of "
            f"{data_file} has {int(longest)} tokens, and int({int(longest)} * {config.interchange_prop}) is 0, so the "
            "causal losses would train nothing; give a larger --interchange_prop"
        )


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


def check_numeric_flags(config: TrainingConfig, options: RunOptions) -> None:
    """Refuse numeric flags outside the values they can take (UserError naming the flag and value)."""
    flags = flag_values(config, options)
    for name, value in flags.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name, (low, high, inclusive) in FLAG_RANGES.items():
        value = flags[name]
        below = value < low if inclusive else value <= low
        above = high is not None and value > high
        if below or above:
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}" if inclusive else f"> {low}"
            raise UserError(f"--{name} must be {bounds}, got {value}")
    if not 0 < config.mlm_mask_prop <= 1:
        raise UserError(f"--mlm_mask_prop must be in (0, 1], got {config.mlm_mask_prop}")
    if config.interchange_max_token == 0 or config.interchange_max_token < -1:
        raise UserError(f"--interchange_max_token must be >= 1, or -1 for no cap; got {config.interchange_max_token}")


def init_distributed(options: RunOptions) -> RunContext:
    """This process's rank, world size and device, from the launcher's environment.

    torchrun sets WORLD_SIZE, RANK, LOCAL_RANK; torch.distributed.launch passes --local-rank and
    the original recipe also set N_GPU_NODE / N_NODES / NODE_RANK. Either way works.
    """
    refuse_bare_slurm_tasks(os.environ)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    global_rank = int(os.environ.get("RANK", 0))
    local_rank = options.local_rank if options.local_rank != -1 else int(os.environ.get("LOCAL_RANK", 0))
    multi_process, is_master = world_size > 1, global_rank == 0
    if not is_master:  # only rank 0 reports progress; warnings still come from every rank
        logging.getLogger().setLevel(logging.WARNING)
        transformers.utils.logging.disable_progress_bar()
    use_cuda = options.n_gpu > 0 and torch.cuda.is_available()
    if options.n_gpu > 0 and not use_cuda and is_master:
        warnings.warn("no CUDA device found: training on CPU", stacklevel=1)
        logger.warning("No CUDA device found: training on CPU (pass --n_gpu 0 to silence this).")
    if options.n_gpu > 1 and not multi_process and use_cuda:
        raise UserError(
            f"--n_gpu {options.n_gpu} needs one process per GPU: launch with "
            f"`torchrun --nproc_per_node {options.n_gpu} causal_train.py ...`"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if multi_process and not dist.is_initialized():
        # Rendezvous from the launcher's MASTER_ADDR / MASTER_PORT (torchrun sets them on every node).
        try:
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=options.ddp_timeout)
            )
        except RuntimeError as e:  # gloo's connection to a peer, or the rendezvous store, timed out
            raise UserError(
                rank_faults.not_connected_message(e, global_rank, world_size, options.ddp_timeout)
            ) from None
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


def cluster_checks(options: RunOptions) -> None:
    """Checks of the launch, precision and logging flags (before any work)."""
    if options.ddp_timeout < 1:
        raise UserError(f"--ddp_timeout must be >= 1 (seconds), got {options.ddp_timeout}")
    if options.is_wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("--is_wandb: the wandb package is not installed (pip install wandb), or drop --is_wandb")


def warn_idle_flags(config: TrainingConfig, options: RunOptions) -> list[str]:
    """Warn about flags that this run reads but that change nothing, and return the warnings.

    A flag whose prerequisite is missing (--restrict_ce_to_mask without --mlm) is refused by
    `sanity_checks`; one that only has no effect at these loss weights is warned about, since
    scripts such as the quickstart give every variant the same flags and vary the weights.
    """
    idle = []
    if options.interchange_mlm:
        idle.append("--interchange_mlm has no effect: the original accepted it and never used it")
    interchange = [
        f"--{name}"
        for name in ("interchange_consecutive_only", "interchange_masked_token_only", "data_augment", "fast_mode")
        if getattr(config, name)
    ]
    if not config.causal and (interchange or options.neuron_mapping is not None):
        flags = ", ".join(interchange + (["--neuron_mapping"] if options.neuron_mapping is not None else []))
        idle.append(f"{flags}: no effect without a causal loss (--alpha_causal_ce or --alpha_causal_cos > 0)")
    elif config.data_augment and options.neuron_mapping is not None:
        idle.append("--neuron_mapping: no effect with --data_augment (token ids are swapped, no activations)")
    if options.token_counts is not None and not config.mlm:
        idle.append("--token_counts: no effect without --mlm (it weights the choice of MLM targets)")
    if config.restrict_ce_to_mask and config.alpha_ce == 0 and config.alpha_causal_ce == 0:
        idle.append("--restrict_ce_to_mask: no effect with --alpha_ce 0 and --alpha_causal_ce 0")
    for line in idle:
        logger.warning(line)
    return idle


def set_precision_backends(options: RunOptions) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions only with --tf32 (exact float32 otherwise)."""
    torch.set_float32_matmul_precision("high" if options.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = options.tf32


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


def start_wandb(options: RunOptions, description: dict):
    """A Weights & Biases run (rank 0) named after the run folder, with the run's parameters as config."""
    import wandb

    return wandb.init(
        project=options.wandb_project,
        name=description["run"]["run_name"],
        config=json.loads(json.dumps(description, default=str)),
    )


def token_probabilities(options: RunOptions, vocab_size: int, special_ids: dict[str, int]) -> torch.Tensor:
    """(vocab,) MLM target weights: max(count, 1) ** -mlm_smoothing, special tokens 0."""
    counts = masking.load_token_counts(options.token_counts, vocab_size)
    return masking.token_probabilities(counts, options.mlm_smoothing, special_ids.values())


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the run folder.

    A run stopped by SIGTERM / SIGINT saves its state and exits with 128 + the signal's number
    (143 / 130), the status the signal itself would have given, so `train && evaluate` stops
    there and a requeue script knows to relaunch with --resume.
    """
    config, options = parse_args(argv)
    sanity_checks(config, options)
    warn_idle_flags(config, options)
    cluster_checks(options)
    set_precision_backends(options)
    context = init_distributed(options)
    lost_rank = False
    try:
        return train(config, options, context)
    except RuntimeError as e:  # a collective with a rank gone: at start-up, in --resume or in the loop
        if context.multi_process and rank_faults.is_collective_failure(e):
            lost_rank = True
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, to the survivors: report first
            raise AbortRun(rank_faults.lost_rank_message(e, context, options.ddp_timeout)) from None
        raise
    finally:
        release_run_locks()
        # A group with a rank gone is not taken down: that could wait on the broken connection (AbortRun ends it).
        if context.multi_process and dist.is_initialized() and not lost_rank:
            dist.destroy_process_group()


def train(config: TrainingConfig, options: RunOptions, context: RunContext) -> Path:
    """Data, teacher, student, distiller, training: everything after the launcher's set-up."""
    sharding.check_flags(config, context.world_size)
    run_dir = Path(options.dump_path) / (options.run_name or default_run_name(config, options, context.world_size))
    on_master(context, lambda: check_run_dir(run_dir, options))  # before the long work, nothing written
    finished = run_finished(run_dir, config) if options.resume else None
    if finished is not None:  # every rank reads the same summary: all return
        if context.is_master:
            logger.warning("%s", finished)
        return run_dir
    set_seed(config.seed)
    if config.fp16 and options.fp16_opt_level != "O1" and context.is_master:
        logger.info("--fp16_opt_level %s: torch.amp has one mixed-precision mode, apex's O1", options.fp16_opt_level)

    # Under --fsdp only rank 0 reads the models' weights; sharding fills the other ranks' shards from its.
    tokenizer, teacher = sharding.load_on_rank0(
        lambda weights: load_teacher(options, weights=weights), config.fsdp, context.is_master
    )
    special_ids = special_token_ids(tokenizer)
    context = dataclasses.replace(
        context, special_token_ids=special_ids, max_model_input_size=max_positions(teacher.config), run_dir=run_dir
    )
    student = sharding.load_on_rank0(
        lambda weights: load_student(options, teacher.config, weights=weights), config.fsdp, context.is_master
    )
    if options.resume:
        check_resumed_student(student.config, run_dir, options.student_config)
    if (config.alpha_cos > 0 or config.alpha_causal_cos > 0) and hidden_size(student) != hidden_size(teacher):
        raise UserError(
            f"cos losses need equal hidden sizes: student {hidden_size(student)}, teacher {hidden_size(teacher)}"
        )
    mapping = None
    if config.causal and not config.data_augment:
        mapping = load_neuron_mapping(options.neuron_mapping)
        validate_neuron_mapping(mapping, teacher.config, student.config, path=options.neuron_mapping)

    token_probs = token_probabilities(options, teacher.config.vocab_size, special_ids) if config.mlm else None
    warn_pickle_in_multi_process(options.data_file, context)
    store = load_sequences(options.data_file)
    check_vocab_range(store, teacher.config.vocab_size, options.data_file)
    check_interchange_reaches(config, store.lengths, context.max_model_input_size, options.data_file)
    dataset = LmSeqsDataset(
        DatasetParams(
            context.max_model_input_size, config.mlm, special_ids, seed=config.seed, family=options.teacher_type
        ),
        store,
    )

    description = run_description(config, options, context)  # parameters.json: the flags as given
    prepare_dump_path(run_dir, options, context)
    if not options.resume:  # at once, beside the marker: the folder is one --force may replace
        write_run_info(description, context, student, tokenizer)

    freeze_embeddings(student, options)
    device = context.device
    student.to(None if config.fsdp else device)  # --fsdp moves only each rank's shards (sharding.shard)
    dtype = teacher_dtype(config, options, device)
    if dtype is not None and context.is_master:
        logger.info("--teacher_fp16: the teacher is kept in %s", str(dtype).removeprefix("torch."))
    teacher.to(None if config.fsdp else device, dtype=dtype)
    for p in teacher.parameters():
        p.requires_grad = False

    # Every rank built the same student from the same seed (DDP also broadcasts rank 0's weights);
    # from here on each rank draws its own dropout masks instead of the same ones on different data.
    torch.manual_seed(config.seed + context.global_rank)
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
        start_wandb=(lambda: start_wandb(options, description)) if options.is_wandb and context.is_master else None,
    )
    if options.resume:
        distiller.resume()
        # Only once the state is accepted: this run's settings, and the tokenizer (folders of older runs had none).
        write_run_info(description, context, student, tokenizer)
    try:
        stopped_by = distiller.train()
    except StopTraining as e:
        raise UserError(str(e)) from None
    except (OSError, SafetensorError) as e:  # the final save_pretrained (states and .pth files: save_atomically)
        raise UserError(
            f"cannot write the student into {run_dir}: {one_line(e)}; what was there before is kept"
        ) from None
    if stopped_by is not None:
        raise SystemExit(128 + (signal.SIGINT if stopped_by == "SIGINT" else signal.SIGTERM))
    return run_dir


if __name__ == "__main__":
    run_cli(main)
