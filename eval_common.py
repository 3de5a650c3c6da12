"""Set-up shared by the evaluation scripts (run_glue.py, run_mlm.py, run_ner.py, run_qa.py).

Only what the four scripts do alike lives here: the model arguments, argument parsing, logging,
finding the checkpoint to resume from, reading local data files or a Hub data set, loading the
config / tokenizer / model with library errors turned into `UserError`s, and the train-and-save
step. Task tables, label handling and metrics stay in the scripts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import get_last_checkpoint

from eval_data import error_cause
from model_files import (  # the model-folder rules every script shares
    check_config_sizes,
    check_tokenizer_files,
    check_weights_header,
    read_config_json,
    weights_file,
    weights_problem,
)
from model_files import check_vocab_size as check_vocab_size  # the scripts call it from here
from run_folders import RUN_MARKER  # the file causal_train.py writes first into every run folder
from utils import (
    UserError,
    atomic_path,
    cannot_write_in,
    check_seed,
    nearest_existing,
    require_file,
    require_no_symlink_loop,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Where the model, its config and its tokenizer come from; scripts may add task flags in a subclass."""

    model_name_or_path: str = field(
        metadata={"help": "A distillation dump folder (config.json + weights) or a Hugging Face model name."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer name or path (a distillation dump has none: e.g. bert-base-uncased)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data sets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token, for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models whose code lives on the Hub."})

    def hub_kwargs(self) -> dict:
        """Keyword arguments for every `from_pretrained` call: cache, revision, token, remote code."""
        return dict(
            cache_dir=self.cache_dir,
            revision=self.model_revision,
            token=self.token,
            trust_remote_code=self.trust_remote_code,
        )


def one_line(error: Exception) -> str:
    """The error's message with its white space (newlines included) folded, for one-line errors."""
    return " ".join(str(error).split())


# ---- set-up

_UNSET = object()


def parse_dataclasses(dataclass_types: tuple[type, ...], argv: list[str] | None) -> tuple:
    """Parse the command line (or one .json file holding the arguments) into one instance per type.

    `argv` None means `sys.argv[1:]`; a parse error becomes a one-line `UserError`. Without
    --report_to, training and evaluation log to TensorBoard (under `--output_dir/runs/`) when it is
    installed, as the transformers 4 scripts did; `--report_to none` turns that off.
    """
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            json_file = require_file(os.path.abspath(argv[0]), "arguments file")
            try:
                report_to_given = "report_to" in json.loads(json_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read the arguments file {json_file}: {one_line(e)}") from None
            parsed = parser.parse_json_file(json_file=str(json_file))
        else:
            parser.set_defaults(report_to=_UNSET)
            report_to_given = parser.parse_known_args(argv)[0].report_to is not _UNSET
            parser.set_defaults(report_to="none")
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, TypeError) as e:
        raise UserError(one_line(e)) from None
    training_args = next((a for a in parsed if isinstance(a, TrainingArguments)), None)
    if training_args is not None and not report_to_given and is_tensorboard_available():
        training_args.report_to = ["tensorboard"]
    return parsed


def check_writable_dir(folder: str | os.PathLike, flag: str) -> None:
    """Raise a `UserError` now, before any work, if `folder` cannot be created or written.

    Nothing is created: the folder itself is probed if it exists, else its nearest existing parent.
    """
    folder = Path(folder)
    require_no_symlink_loop(folder, flag)
    probe = nearest_existing(folder)
    if not probe.is_dir():
        raise UserError(f"{flag} {folder} cannot be created: {probe} is not a folder")
    problem = cannot_write_in(probe)
    if problem is not None:
        blocked = "" if probe == folder else f" ({probe} is not writable)"
        raise UserError(f"{flag} {folder} cannot be written{blocked}: {problem}")


TRAINER_STATE = "trainer_state.json"  # what makes a `checkpoint-<step>/` folder a Trainer checkpoint
_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


def distillation_run_folder(folder: Path) -> Path | None:
    """The distillation run folder (holding `RUN_MARKER`) that `folder` is or lies in, or None."""
    folder = folder.resolve()
    return next((p for p in [folder, *folder.parents] if (p / RUN_MARKER).is_file()), None)


def check_output_dir(training_args: TrainingArguments, model_args: ModelArguments) -> None:
    """Refuse, before any work, an --output_dir the run cannot or must not write.

    Besides `check_writable_dir`: the folder must not be one a model, config or tokenizer is read
    from (training would replace it), nor hold such a folder when training (the Trainer deletes old
    `checkpoint-*` folders there); it must not be or lie in a distillation run folder (causal_train.py
    owns those); and when training, every `checkpoint-<step>/` in it must be a Trainer checkpoint
    (hold trainer_state.json): training would resume from it, and the Trainer deletes old ones.
    """
    check_writable_dir(training_args.output_dir, "--output_dir")
    out = Path(training_args.output_dir).expanduser().resolve()
    sources = (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--config_name", model_args.config_name),
        ("--tokenizer_name", model_args.tokenizer_name),
    )
    for flag, name in sources:
        path = Path(name).expanduser() if name else None
        if path is None or not path.is_dir():
            continue
        path = path.resolve()
        if path == out:
            raise UserError(
                f"--output_dir {training_args.output_dir} is the folder {flag} reads from: the results would "
                "be written over it; give another --output_dir"
            )
        if training_args.do_train and out in path.parents:
            raise UserError(
                f"{flag} {name} lies inside --output_dir {training_args.output_dir}, where training saves and "
                "deletes checkpoints; give another --output_dir"
            )
    run_folder = distillation_run_folder(out)
    if run_folder is not None:
        raise UserError(
            f"--output_dir {training_args.output_dir} is "
            + ("" if run_folder == out else "inside ")
            + f"the distillation run folder {run_folder} (it holds {RUN_MARKER}): causal_train.py owns it; "
            "give another --output_dir"
        )
    if training_args.do_train and out.is_dir():
        for checkpoint in sorted(p for p in out.iterdir() if _CHECKPOINT_NAME.match(p.name) and p.is_dir()):
            if not (checkpoint / TRAINER_STATE).is_file():
                raise UserError(
                    f"--output_dir {training_args.output_dir} holds {checkpoint.name}/ without {TRAINER_STATE}: "
                    "not a complete Trainer checkpoint (a distillation checkpoint, or a save cut short), which "
                    "training would resume from or delete; give another --output_dir"
                )


def check_run_flags(
    data_args: object,
    training_args: TrainingArguments,
    stages: Sequence[str] = ("--do_train", "--do_eval", "--do_predict"),
) -> None:
    """Flags that cannot work together or cannot be right, refused before any work starts.

    `stages` are the script's --do_* flags; at least one must be given.
    """
    if not any(getattr(training_args, flag[2:]) for flag in stages):
        raise UserError(f"nothing to do: pass {', '.join(stages[:-1])} or {stages[-1]}")
    for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
        value = getattr(data_args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    for flag in ("seed", "data_seed"):
        check_seed(getattr(training_args, flag), f"--{flag}")
    resume = training_args.resume_from_checkpoint
    if resume is not None and training_args.do_train:
        require_no_symlink_loop(resume, "--resume_from_checkpoint")
        if not Path(resume).is_dir():
            raise UserError(f"--resume_from_checkpoint folder not found: {resume}")
        if not (Path(resume) / TRAINER_STATE).is_file():
            raise UserError(
                f"--resume_from_checkpoint {resume} is not a Trainer checkpoint (no {TRAINER_STATE}); "
                "to fine-tune a distillation checkpoint, pass it as --model_name_or_path"
            )


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger) -> None:
    """Give the script's logger, this module's, `datasets` and `transformers` the process's log level."""
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    script_logger.setLevel(log_level)
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def detect_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """The newest `checkpoint-*` folder in --output_dir when training, else None.

    Training resumes from it unless --resume_from_checkpoint names another.
    """
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    last_checkpoint = get_last_checkpoint(training_args.output_dir)
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(f"Resuming from {last_checkpoint}; give another --output_dir to train from scratch.")
    return last_checkpoint


# ---- model


def local_folder(name: str, flag: str) -> Path | None:
    """`name` as a local folder, None for a Hub name; a `UserError` for a path that is not a folder.

    A name that exists locally, or is written as a path (`./x`, `../x`, `/x`, `~/x`, `x/` or more
    than one `/`), is local; anything else (`bert-base-uncased`, `org/model`) goes to the Hub.
    """
    path = Path(name).expanduser()
    require_no_symlink_loop(path, flag)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {name} is a file; give the model folder that holds it")
        return path
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        raise UserError(f"{flag} folder not found: {name}")
    return None


def load_config(model_args: ModelArguments) -> PretrainedConfig:
    """The model config, from --config_name or else --model_name_or_path.

    A config.json that is not a JSON object, or whose sizes are not positive integers, is a
    `UserError` naming the file and the field.
    """
    flag = "--config_name" if model_args.config_name else "--model_name_or_path"
    config_source = model_args.config_name or model_args.model_name_or_path
    local = local_folder(model_args.model_name_or_path, "--model_name_or_path")
    folder = local_folder(config_source, flag) if model_args.config_name else local
    config_file = folder / "config.json" if folder is not None else None
    if config_file is not None and not config_file.is_file():
        raise UserError(
            f"no config.json in {config_source}: a model folder needs config.json and its weights "
            "(model.safetensors or pytorch_model.bin)" + ("" if model_args.config_name else ", or pass --config_name")
        )
    shown = config_file or config_source
    raw = read_config_json(config_file, config_source) if config_file is not None else None
    try:
        config = AutoConfig.from_pretrained(config_source, **model_args.hub_kwargs())
    except StrictDataclassError as e:  # a field of the wrong type, e.g. "n_layers": "4"
        raise UserError(f"cannot load a model config from {shown}: {one_line(e)}") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        hint = "" if folder is not None else f" (no local folder {config_source} either)"
        raise UserError(f"cannot load a model config from {config_source}{hint}: {one_line(e)}") from None
    check_config_sizes(config, raw, shown)
    return config


def load_tokenizer(model_args: ModelArguments, **tokenizer_kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer, from --tokenizer_name or else --model_name_or_path (a distillation dump has none).

    Its `name_or_path` is that source, for error messages.
    """
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    folder = local_folder(tokenizer_source, flag)
    # transformers 5 builds an empty-vocabulary tokenizer from a folder without tokenizer files:
    # every word would become [UNK], so such a folder is refused here.
    if folder is not None:
        check_tokenizer_files(folder, _tokenizer_hint(folder, flag))
    try:
        return AutoTokenizer.from_pretrained(tokenizer_source, **tokenizer_kwargs, **model_args.hub_kwargs())
    except Exception as e:  # many types for one cause: the tokenizer files cannot be read
        raise UserError(
            f"cannot load a tokenizer from {tokenizer_source} ({one_line(e)}); "
            + (
                "a distillation dump has none: pass --tokenizer_name, e.g. bert-base-uncased"
                if flag == "--model_name_or_path"
                else "check --tokenizer_name"
            )
        ) from None


def _tokenizer_hint(folder: Path, flag: str) -> str:
    """What to pass instead of a folder without tokenizer: the run's teacher if it is a distillation run."""
    if flag == "--tokenizer_name":
        return "give a tokenizer folder or name to --tokenizer_name, e.g. bert-base-uncased"
    teacher = None
    try:
        teacher = json.loads((folder / "parameters.json").read_text()).get("teacher_name")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(teacher, str) and teacher:
        return (
            "it is a distillation run folder without a tokenizer (made before runs saved one): "
            f"pass --tokenizer_name {teacher} (its teacher's)"
        )
    return (
        "pass --tokenizer_name, e.g. bert-base-uncased "
        "(distillation dumps made before runs saved their teacher's tokenizer hold none)"
    )


def load_model(
    model_class: type, model_args: ModelArguments, config: PretrainedConfig, **model_kwargs
) -> PreTrainedModel:
    """`model_class.from_pretrained(--model_name_or_path, config=config, ...)`, e.g. AutoModelForMaskedLM.

    A pytorch_model.bin is read with `weights_only=True` (tensors only: nothing in it runs).
    """
    folder = local_folder(model_args.model_name_or_path, "--model_name_or_path")
    weights = weights_file(folder) if folder else None
    if weights is not None:
        check_weights_header(weights, model_args.model_name_or_path)
    try:
        return model_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            weights_only=True,
            **model_kwargs,
            **model_args.hub_kwargs(),
        )
    except Exception as e:  # many types (OSError, SafetensorError, UnpicklingError, ...) for one cause: bad weights
        problem = weights_problem(weights, e)
        if problem is None and "ignore_mismatched_sizes" in str(e) and not model_kwargs.get("ignore_mismatched_sizes"):
            problem = "a tensor in its weights does not have the shape its config.json gives (listed above)"
        problem = problem or error_cause(e)
        raise UserError(f"cannot load model {model_args.model_name_or_path}: {problem}") from None


def require_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise a `UserError` for a tokenizer without a padding token (GPT-2-like): batches cannot be padded."""
    if tokenizer.pad_token is None:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path} has no padding token, which batches of unequal length need; "
            "give a tokenizer that has one (--tokenizer_name)"
        )


def model_input_limit(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The longest input (in tokens) both the tokenizer and the model's position embeddings take."""
    return min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", tokenizer.model_max_length))


# ---- train


def train_and_save(trainer: Trainer, last_checkpoint: str | None) -> None:
    """Train, then save the model, the train metrics (`train_results.json`) and the trainer state.

    Training resumes from --resume_from_checkpoint if given, else from `last_checkpoint` (if not None).
    """
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint or last_checkpoint)
    save_model(trainer)
    metrics = dict(train_result.metrics, train_samples=len(trainer.train_dataset))
    trainer.log_metrics("train", metrics)
    save_metrics(trainer, "train", metrics)
    try:
        trainer.save_state()
    except OSError as e:
        out = trainer.args.output_dir
        raise UserError(f"cannot write trainer_state.json in --output_dir {out}: {e.strerror or one_line(e)}") from None


def save_model(trainer: Trainer) -> None:
    """`trainer.save_model()`, into a hidden folder whose files then replace those in --output_dir.

    A save cut short (disk full) leaves the folder's earlier files as they were and is a `UserError`.
    """
    out = Path(trainer.args.output_dir)
    staging = out / ".saving"
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save:
            for path in staging.iterdir():
                os.replace(path, out / path.name)
    except OSError as e:
        raise UserError(
            f"cannot save the fine-tuned model in --output_dir {out}: {e.strerror or one_line(e)} "
            "(nothing there was replaced)"
        ) from None
    finally:
        if trainer.args.should_save and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_metrics(trainer: Trainer, split: str, metrics: dict) -> None:
    """`trainer.save_metrics(split, metrics)` (`{split}_results.json`, merged into `all_results.json`),
    each file written atomically; a write that fails (disk full) is a `UserError` and leaves the old file."""
    if not trainer.is_world_process_zero():
        return
    out = Path(trainer.args.output_dir)
    try:
        all_path = out / "all_results.json"
        all_metrics = json.loads(all_path.read_text(encoding="utf-8")) if all_path.exists() else {}
        all_metrics.update(metrics)
        for path, content in ((out / f"{split}_results.json", metrics), (all_path, all_metrics)):
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=4, sort_keys=True)
    except OSError as e:
        raise UserError(
            f"cannot write the {split} results in --output_dir {out}: {e.strerror or one_line(e)}"
        ) from None
