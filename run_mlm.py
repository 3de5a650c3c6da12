"""Evaluate (and optionally fine-tune) a distilled model on masked language modelling.

    python run_mlm.py --model_name_or_path ./path_to_your_model/ --dataset_dir ../path_to_your_data/ \
        --tokenizer_name bert-base-uncased --do_eval --output_dir /tmp/test-mlm --cache_dir ./distill_cache/

Text comes from `--dataset_dir` (a DatasetDict or Dataset saved with `save_to_disk`), a Hub data set
(`--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1`), or `--train_file/
--validation_file` (txt: one text per line; csv/json/jsonl: `--text_column_name`). Texts are
concatenated and cut into blocks of `--max_seq_length` tokens, or kept one per line with
`--line_by_line`; `--mlm_probability` of the tokens are masked. Scores: the masked tokens' mean
cross-entropy `eval_loss`, its `perplexity` and the arg-max `eval_accuracy`, written to
`eval_results.json` / `all_results.json`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import datasets
import torch
import transformers
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import eval_metrics
from utils import UserError, require_file, run_cli

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` loader that reads it.
file_loaders = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass
class ModelArguments:
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


@dataclass
class DataTrainingArguments:
    dataset_dir: str | None = field(default=None, metadata={"help": "A data set saved with save_to_disk."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set, e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training text (txt, csv, json or jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation text (txt, csv, json or jsonl)."})
    text_column_name: str | None = field(default=None, metadata={"help": "Column holding the text (default: text)."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."}
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Tokens per sequence (default: the model's limit)."})
    line_by_line: bool = field(default=False, metadata={"help": "One sequence per line instead of packed blocks."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "With --line_by_line, pad to max_seq_length."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens masked."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training sequences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation sequences."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo tokenisation instead of using the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError(f"--mlm_probability must be between 0 and 1, got {self.mlm_probability}")


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse the command line (or one .json file holding the arguments) into the three groups."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:
        raise UserError(one_line(e)) from None


def load_raw_datasets(data_args: DataTrainingArguments, training_args: TrainingArguments,
                      cache_dir: str | None) -> tuple[DatasetDict, dict[str, str]]:
    """The raw splits, and where each came from (for error messages).

    A plain Dataset in --dataset_dir is evaluation data, unless training: then it is the training
    data. Training data without a validation split gives up --validation_split_percentage of it.
    """
    files = {split: path for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file))
             if path is not None}
    if data_args.dataset_dir is not None:
        if not Path(data_args.dataset_dir).is_dir():
            raise UserError(f"--dataset_dir not found: {data_args.dataset_dir}")
        try:
            loaded = load_from_disk(data_args.dataset_dir)
        except Exception as e:  # not a save_to_disk folder
            raise UserError(f"cannot load {data_args.dataset_dir} (expected a save_to_disk folder): "
                            f"{one_line(e)}") from None
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({"train" if training_args.do_train else "validation": loaded})
        raw, origin = loaded, {split: f"{data_args.dataset_dir} ({split})" for split in loaded}
    elif files:
        raw = DatasetDict()
        for split, path in files.items():
            loader = file_loaders.get(require_file(path, f"--{split}_file").suffix.lower())
            if loader is None:
                raise UserError(f"--{split}_file must be one of {', '.join(file_loaders)}: {path}")
            try:
                raw[split] = load_dataset(loader, data_files={split: path}, cache_dir=cache_dir)[split]
            except Exception as e:  # the loaders raise many types for one cause: an unreadable file
                raise UserError(f"cannot read {path}: {one_line(e)}") from None
        origin = files
    elif data_args.dataset_name is not None:
        try:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        except Exception as e:
            raise UserError(
                f"cannot load {data_args.dataset_name} from the Hugging Face Hub: {one_line(e)}; "
                "offline, pass --dataset_dir or --train_file/--validation_file"
            ) from None
        origin = {}
    else:
        raise UserError("no data: pass --dataset_dir, --dataset_name or --train_file/--validation_file")

    if "validation" not in raw and "train" in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100,
                                                  seed=training_args.seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
        origin = {split: f"{origin.get('train', 'the train split')} ({split} part)" for split in raw}
    return raw, origin


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)

    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    last_checkpoint = None
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Resuming from {last_checkpoint}; give another --output_dir to train from scratch.")

    set_seed(training_args.seed)

    # ---- data
    raw_datasets, origin = load_raw_datasets(data_args, training_args, model_args.cache_dir)
    for flag, split in (("--do_train", "train"), ("--do_eval", "validation")):
        if getattr(training_args, flag[2:]) and split not in raw_datasets:
            raise UserError(f"{flag} needs {split} data: pass --{split}_file, or a --dataset_dir holding a {split} split")
    splits = [s for s, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted]
    first = raw_datasets[splits[0] if splits else next(iter(raw_datasets))]
    text_column = data_args.text_column_name or ("text" if "text" in first.column_names else first.column_names[0])
    for split in splits:
        if text_column not in raw_datasets[split].column_names:
            raise UserError(
                f"column '{text_column}' not found in {origin.get(split, f'the {split} split')} "
                f"(columns: {', '.join(raw_datasets[split].column_names)}); see --text_column_name"
            )

    # ---- model
    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                      token=model_args.token, trust_remote_code=model_args.trust_remote_code)
    config_source = model_args.config_name or model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(config_source, **hub_kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from {config_source}: {one_line(e)}") from None
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **hub_kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"cannot load a tokenizer from {tokenizer_source} ({one_line(e)}); "
            "a distillation dump has none: pass --tokenizer_name, e.g. bert-base-uncased"
        ) from None
    if tokenizer.mask_token is None:
        raise UserError(f"tokenizer {tokenizer_source} has no mask token: it cannot be used for masked language modelling")
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    try:
        model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path, config=config, **hub_kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load model {model_args.model_name_or_path}: {one_line(e)}") from None

    model_limit = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", tokenizer.model_max_length))
    max_seq_length = min(data_args.max_seq_length or model_limit, model_limit)

    def tokenize_lines(examples: dict) -> dict:
        lines = [line for line in examples[text_column] if line and not line.isspace()]
        return tokenizer(lines, padding="max_length" if data_args.pad_to_max_length else False, truncation=True,
                         max_length=max_seq_length, return_special_tokens_mask=True)

    def tokenize_texts(examples: dict) -> dict:
        return tokenizer(examples[text_column], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:
        """Concatenate the tokenised texts and cut them into blocks of max_seq_length (the rest is dropped)."""
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // max_seq_length) * max_seq_length
        return {k: [v[i:i + max_seq_length] for i in range(0, total, max_seq_length)] for k, v in concatenated.items()}

    def prepare(split: str, limit: int | None) -> Dataset:
        ds = raw_datasets[split]
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            map_kwargs = dict(batched=True, num_proc=data_args.preprocessing_num_workers,
                              load_from_cache_file=not data_args.overwrite_cache)
            if data_args.line_by_line:
                ds = ds.map(tokenize_lines, remove_columns=ds.column_names, desc=f"Tokenizing {split}", **map_kwargs)
            else:
                ds = ds.map(tokenize_texts, remove_columns=ds.column_names, desc=f"Tokenizing {split}", **map_kwargs)
                ds = ds.map(group_texts, desc=f"Grouping {split} in blocks of {max_seq_length}", **map_kwargs)
        if len(ds) == 0:
            raise UserError(f"no sequence of {max_seq_length} tokens in {origin.get(split, split)}: "
                            "lower --max_seq_length or use --line_by_line")
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds

    train_dataset = prepare("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = prepare("validation", data_args.max_eval_samples) if training_args.do_eval else None

    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Keep arg-max ids, not (batch, seq_len, vocab) logits, across the evaluation loop.
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(p: EvalPrediction) -> dict:
        return {"accuracy": eval_metrics.mlm_accuracy(p.predictions, p.label_ids)}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=data_args.mlm_probability,
            pad_to_multiple_of=8 if training_args.fp16 and data_args.line_by_line else None,
        ),
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )

    # ---- train
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # ---- evaluate
    results = {}
    if training_args.do_eval:
        set_seed(training_args.seed)  # the same masks whether or not the model was trained first
        results = trainer.evaluate()
        results["eval_samples"] = len(eval_dataset)
        results["perplexity"] = eval_metrics.perplexity(results["eval_loss"])
        trainer.log_metrics("eval", results)
        trainer.save_metrics("eval", results)
    return results


if __name__ == "__main__":
    run_cli(main)
