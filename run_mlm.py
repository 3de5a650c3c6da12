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
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)

import eval_common
import eval_data
import eval_metrics
from eval_common import ModelArguments, one_line
from eval_data import where
from utils import UserError, run_cli

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` loader that reads it.
file_loaders = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}


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
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Tokens per sequence (default: the model's limit)."}
    )
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
        if not 0 < self.validation_split_percentage < 100:
            raise UserError(
                f"--validation_split_percentage must be between 1 and 99, got {self.validation_split_percentage}"
            )


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse the command line (or one .json file holding the arguments) into the three groups."""
    return eval_common.parse_dataclasses((ModelArguments, DataTrainingArguments, TrainingArguments), argv)


def load_raw_datasets(
    data_args: DataTrainingArguments, training_args: TrainingArguments, cache_dir: str | None
) -> tuple[DatasetDict, dict[str, str]]:
    """The raw splits, and where each came from (for error messages).

    A plain Dataset in --dataset_dir is evaluation data, unless training: then it is the training
    data. Training data without a validation split gives up --validation_split_percentage of it.
    """
    files = eval_data.given_files(data_args, ("train", "validation"))
    if data_args.dataset_dir is not None:
        eval_common.require_no_symlink_loop(data_args.dataset_dir, "--dataset_dir")
        if not Path(data_args.dataset_dir).is_dir():
            raise UserError(f"--dataset_dir not found: {data_args.dataset_dir}")
        try:
            loaded = load_from_disk(data_args.dataset_dir)
        except Exception as e:  # not a save_to_disk folder
            raise UserError(
                f"cannot load {data_args.dataset_dir} (expected a save_to_disk folder): {one_line(e)}"
            ) from None
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({"train" if training_args.do_train else "validation": loaded})
        raw, origin = loaded, {split: f"{data_args.dataset_dir} ({split})" for split in loaded}
    elif files:
        expected = "one of " + ", ".join(file_loaders)
        raw = eval_data.load_local_files(files, file_loaders, cache_dir, expected)
        origin = files
    elif data_args.dataset_name is not None:
        offline_hint = "offline, pass --dataset_dir or --train_file/--validation_file"
        raw = eval_data.load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir, offline_hint)
        origin = {}
    else:
        raise UserError("no data: pass --dataset_dir, --dataset_name or --train_file/--validation_file")

    if "validation" not in raw and "train" in raw:
        held_out = raw["train"].train_test_split(
            test_size=data_args.validation_split_percentage / 100, seed=training_args.seed
        )
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
        origin = {split: f"{where('train', origin)} ({split} part)" for split in raw}
    return raw, origin


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    if training_args.do_predict:
        raise UserError("run_mlm.py has no --do_predict: score the data with --do_eval")
    eval_common.check_run_flags(data_args, training_args, stages=("--do_train", "--do_eval"))
    eval_common.check_output_dir(training_args, model_args)
    eval_common.setup_logging(training_args, logger)
    last_checkpoint = eval_common.detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    # ---- data
    raw_datasets, origin = load_raw_datasets(data_args, training_args, model_args.cache_dir)
    for flag, split in (("--do_train", "train"), ("--do_eval", "validation")):
        if getattr(training_args, flag[2:]) and split not in raw_datasets:
            raise UserError(
                f"{flag} needs {split} data: pass --{split}_file, or a --dataset_dir holding a {split} split"
            )
    splits = [s for s, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted]
    first = raw_datasets[splits[0] if splits else next(iter(raw_datasets))]
    text_column = data_args.text_column_name or ("text" if "text" in first.column_names else first.column_names[0])
    for split in splits:
        eval_data.require_columns(
            raw_datasets[split], [text_column], where(split, origin), hint="see --text_column_name"
        )
        arrow_type = raw_datasets[split].data.schema.field(text_column).type
        if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)):
            raise UserError(
                f"column '{text_column}' in {where(split, origin)} must hold text, found "
                f"{eval_data.describe(arrow_type)}; "
                "see --text_column_name"
            )

    # ---- model
    config = eval_common.load_config(model_args)
    tokenizer = eval_common.load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path} has no mask token: it cannot be used for masked language modelling"
        )
    eval_common.require_pad_token(tokenizer)  # the MLM collator pads every batch, even grouped texts
    eval_common.check_vocab_size(tokenizer, config)
    model = eval_common.load_model(AutoModelForMaskedLM, model_args, config)

    model_limit = eval_common.model_input_limit(tokenizer, config)
    max_seq_length = min(data_args.max_seq_length or model_limit, model_limit)

    # A missing value (an empty csv cell, a json null) counts as a blank line.
    def tokenize_lines(examples: dict) -> dict:
        lines = [line for line in examples[text_column] if line and not line.isspace()]
        return tokenizer(
            lines,
            padding="max_length" if data_args.pad_to_max_length else False,
            truncation=True,
            max_length=max_seq_length,
            return_special_tokens_mask=True,
        )

    def tokenize_texts(examples: dict) -> dict:
        return tokenizer([text or "" for text in examples[text_column]], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:
        """Concatenate the tokenised texts and cut them into blocks of max_seq_length (the rest is dropped)."""
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // max_seq_length) * max_seq_length
        return {
            k: [v[i : i + max_seq_length] for i in range(0, total, max_seq_length)] for k, v in concatenated.items()
        }

    def prepare(split: str, limit: int | None) -> Dataset:
        ds = raw_datasets[split]
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            map_kwargs = dict(
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
            )
            if data_args.line_by_line:
                ds = ds.map(tokenize_lines, remove_columns=ds.column_names, desc=f"Tokenizing {split}", **map_kwargs)
            else:
                ds = ds.map(tokenize_texts, remove_columns=ds.column_names, desc=f"Tokenizing {split}", **map_kwargs)
                ds = ds.map(group_texts, desc=f"Grouping {split} in blocks of {max_seq_length}", **map_kwargs)
        if len(ds) == 0:
            raise UserError(
                f"no sequence of {max_seq_length} tokens in {origin.get(split, split)}: "
                "lower --max_seq_length or use --line_by_line"
            )
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
            tokenizer,
            mlm_probability=data_args.mlm_probability,
            pad_to_multiple_of=8 if training_args.fp16 and data_args.line_by_line else None,
        ),
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )

    # ---- train
    if training_args.do_train:
        eval_common.train_and_save(trainer, last_checkpoint)

    # ---- evaluate
    results = {}
    if training_args.do_eval:
        set_seed(training_args.seed)  # the same masks whether or not the model was trained first
        results = trainer.evaluate()
        results["eval_samples"] = len(eval_dataset)
        results["perplexity"] = eval_metrics.perplexity(results["eval_loss"])
        trainer.log_metrics("eval", results)
        eval_common.save_metrics(trainer, "eval", results)
    return results


if __name__ == "__main__":
    run_cli(main)
