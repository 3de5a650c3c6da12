"""Set-up shared by the evaluation scripts (run_glue.py, run_mlm.py, run_ner.py, run_qa.py).

Only what the four scripts do alike lives here: the model arguments, argument parsing, logging,
finding the checkpoint to resume from, reading local data files or a Hub data set, loading the
config / tokenizer / model with library errors turned into `UserError`s, and the train-and-save
step. Task tables, label handling and metrics stay in the scripts.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import datasets
import transformers
from datasets import Dataset, DatasetDict, load_dataset
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
from transformers.trainer_utils import get_last_checkpoint

from utils import UserError, require_file

logger = logging.getLogger(__name__)

# The `datasets` builder that reads a file ("csv", "json", "text"), or a function
# (path, split, cache_dir) -> Dataset for a layout no builder reads.
FileLoader = str | Callable[[str, str, str | None], Dataset]


@dataclass
class ModelArguments:
    """Where the model, its config and its tokenizer come from; scripts may add task flags in a subclass."""

    model_name_or_path: str = field(
        metadata={"help": "A distillation dump folder (config.json + weights) or a Hugging Face model name."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path (a distillation dump has none: e.g. bert-base-uncased)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data sets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token, for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models whose code lives on the Hub."})

    def hub_kwargs(self) -> dict:
        """Keyword arguments for every `from_pretrained` call: cache, revision, token, remote code."""
        return dict(cache_dir=self.cache_dir, revision=self.model_revision,
                    token=self.token, trust_remote_code=self.trust_remote_code)


def one_line(error: Exception) -> str:
    """The error's message with its white space (newlines included) folded, for one-line errors."""
    return " ".join(str(error).split())


def where(split: str, files: Mapping[str, str]) -> str:
    """The file a split was read from, or `the <split> split`, for error messages."""
    return files.get(split, f"the {split} split")


# ---- set-up

def parse_dataclasses(dataclass_types: tuple[type, ...], argv: list[str] | None) -> tuple:
    """Parse the command line (or one .json file holding the arguments) into one instance per type.

    `argv` None means `sys.argv[1:]`; a parse error becomes a one-line `UserError`.
    """
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:
        raise UserError(one_line(e)) from None


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


# ---- data

def given_files(data_args: object, splits: Sequence[str]) -> dict[str, str]:
    """Split -> path, for the splits (in `splits` order) whose `--{split}_file` was given."""
    paths = {split: getattr(data_args, f"{split}_file") for split in splits}
    return {split: path for split, path in paths.items() if path is not None}


def load_local_files(files: Mapping[str, str], file_loaders: Mapping[str, FileLoader], cache_dir: str | None,
                     expected: str) -> DatasetDict:
    """Read each split's file (`files`: split -> path) with the loader for its suffix.

    A missing file, a suffix not in `file_loaders` (the error says the file `must be {expected}`) or
    an unreadable file raises a `UserError` naming the flag or the file.
    """
    raw = DatasetDict()
    for split, path in files.items():
        loader = file_loaders.get(require_file(path, f"--{split}_file").suffix.lower())
        if loader is None:
            raise UserError(f"--{split}_file must be {expected}: {path}")
        try:
            raw[split] = (
                load_dataset(loader, data_files={split: path}, cache_dir=cache_dir)[split]
                if isinstance(loader, str) else loader(path, split, cache_dir)
            )
        except Exception as e:  # the loaders raise many types for one cause: an unreadable file
            raise UserError(f"cannot read {path}: {one_line(e)}") from None
    return raw


def require_columns(dataset: Dataset, columns: Iterable[str], source: str, hint: str | None = None) -> None:
    """Raise a `UserError` naming the first of `columns` missing from `dataset` (read from `source`)."""
    for column in columns:
        if column not in dataset.column_names:
            raise UserError(
                f"column '{column}' not found in {source} (columns: {', '.join(dataset.column_names)})"
                + (f"; {hint}" if hint else "")
            )


def load_hub_dataset(name: str, config_name: str | None, cache_dir: str | None, offline_hint: str,
                     shown_as: str | None = None) -> DatasetDict:
    """A data set from the Hugging Face Hub; failing that, a `UserError` that ends with `offline_hint`.

    `shown_as` is how the error names the data set (default: `name`).
    """
    try:
        return load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as e:
        raise UserError(
            f"cannot load {shown_as or name} from the Hugging Face Hub: {one_line(e)}; {offline_hint}"
        ) from None


# ---- model

def load_config(model_args: ModelArguments) -> PretrainedConfig:
    """The model config, from --config_name or else --model_name_or_path."""
    config_source = model_args.config_name or model_args.model_name_or_path
    try:
        return AutoConfig.from_pretrained(config_source, **model_args.hub_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from {config_source}: {one_line(e)}") from None


def load_tokenizer(model_args: ModelArguments, **tokenizer_kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer, from --tokenizer_name or else --model_name_or_path (a distillation dump has none).

    Its `name_or_path` is that source, for error messages.
    """
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(tokenizer_source, **tokenizer_kwargs, **model_args.hub_kwargs())
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"cannot load a tokenizer from {tokenizer_source} ({one_line(e)}); "
            "a distillation dump has none: pass --tokenizer_name, e.g. bert-base-uncased"
        ) from None


def check_vocab_size(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Raise a `UserError` if the tokenizer has ids the model has no embedding for."""
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )


def load_model(model_class: type, model_args: ModelArguments, config: PretrainedConfig,
               **model_kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained(--model_name_or_path, config=config, ...)`, e.g. AutoModelForMaskedLM."""
    try:
        return model_class.from_pretrained(model_args.model_name_or_path, config=config, **model_kwargs,
                                           **model_args.hub_kwargs())
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load model {model_args.model_name_or_path}: {one_line(e)}") from None


def model_input_limit(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The longest input (in tokens) both the tokenizer and the model's position embeddings take."""
    return min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", tokenizer.model_max_length))


# ---- train

def train_and_save(trainer: Trainer, last_checkpoint: str | None) -> None:
    """Train, then save the model, the train metrics (`train_results.json`) and the trainer state.

    Training resumes from --resume_from_checkpoint if given, else from `last_checkpoint` (if not None).
    """
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint or last_checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics, train_samples=len(trainer.train_dataset))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
