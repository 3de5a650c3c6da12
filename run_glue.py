"""Fine-tune and evaluate a distilled model on a GLUE task, or on your own (sentence-pair) files.

    python run_glue.py --model_name_or_path ./path_to_your_model/ --tokenizer_name bert-base-uncased \
        --task_name sst2 --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 \
        --learning_rate 2e-5 --num_train_epochs 3 --output_dir ./results/ --save_total_limit 1

`--task_name` alone downloads the task from the Hugging Face Hub. Offline, give the files:
`--train_file/--validation_file/--test_file` (csv, json or jsonl; MNLI may add
`--validation_mismatched_file`) with the Hub's GLUE columns (e.g. `sentence`, `label`); labels are
ids or the task's label names. Without `--task_name` the text columns are inferred and `label` is
the target (float labels mean regression). Metrics go to `eval_results.json` / `all_results.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets import DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import eval_common
import eval_data
import eval_metrics
from eval_common import ModelArguments
from eval_data import where
from utils import UserError, atomic_path, run_cli

logger = logging.getLogger(__name__)

GLUE_HUB_NAME = "nyu-mll/glue"

# File suffix -> the `datasets` loader that reads it.
file_loaders = {".csv": "csv", ".json": "json", ".jsonl": "json"}

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# Label names in the order of the Hub's label ids; STS-B is a regression task.
task_to_labels = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "stsb": None,
    "wnli": ["not_entailment", "entailment"],
}

# Splits evaluated (or predicted) when present, and the suffix their metric keys get:
# MNLI's mismatched scores are reported beside the matched ones as `eval_accuracy_mm`.
eval_split_suffix = {"validation": "", "validation_matched": "", "validation_mismatched": "_mm"}
test_split_suffix = {"test": "", "test_matched": "", "test_mismatched": "_mm"}


@dataclass
class GlueModelArguments(ModelArguments):
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Use a model whose trained classification head has other labels: the head is re-initialised."
        },
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": "GLUE task: " + ", ".join(task_to_keys)})
    dataset_name: str | None = field(default=None, metadata={"help": "Another Hub data set (text columns inferred)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data (csv, json or jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data (MNLI: matched)."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI mismatched evaluation data."})
    test_file: str | None = field(default=None, metadata={"help": "Data to predict (labels not needed)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to max_seq_length instead of to the batch's longest."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test examples."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo tokenisation instead of using the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in task_to_keys:
                raise UserError(f"unknown --task_name {self.task_name!r}; choose one of {', '.join(task_to_keys)}")


def parse_args(argv: list[str] | None) -> tuple[GlueModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse the command line (or one .json file holding the arguments) into the three groups."""
    return eval_common.parse_dataclasses((GlueModelArguments, DataTrainingArguments, TrainingArguments), argv)


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> tuple[DatasetDict, dict[str, str]]:
    """The raw splits, and for local files the file each split came from (for error messages)."""
    files = eval_data.given_files(data_args, ("train", "validation", "validation_mismatched", "test"))
    if files:
        return eval_data.load_local_files(files, file_loaders, cache_dir, expected=".csv, .json or .jsonl"), files
    if data_args.task_name is None and data_args.dataset_name is None:
        raise UserError("no data: pass --task_name, --dataset_name or --train_file/--validation_file")
    name, config = (
        (GLUE_HUB_NAME, data_args.task_name)
        if data_args.dataset_name is None
        else (data_args.dataset_name, data_args.dataset_config_name)
    )
    offline_hint = "offline, pass local files with --train_file/--validation_file"
    return eval_data.load_hub_dataset(name, config, cache_dir, offline_hint, shown_as=f"{name} ({config})"), {}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    eval_common.check_run_flags(data_args, training_args)
    eval_common.check_output_dir(training_args, model_args)
    eval_common.setup_logging(training_args, logger)
    last_checkpoint = eval_common.detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    # ---- data
    raw_datasets, files = load_raw_datasets(data_args, model_args.cache_dir)
    task_name = data_args.task_name
    eval_splits = [s for s in eval_split_suffix if s in raw_datasets]
    test_splits = [s for s in test_split_suffix if s in raw_datasets]
    if training_args.do_train and "train" not in raw_datasets:
        raise UserError("--do_train needs training data: pass --train_file (or --task_name with network)")
    if training_args.do_eval and not eval_splits:
        raise UserError("--do_eval needs evaluation data: pass --validation_file (or --task_name with network)")
    if training_args.do_predict and not test_splits:
        raise UserError("--do_predict needs test data: pass --test_file (or --task_name with network)")
    labelled_splits = (["train"] if "train" in raw_datasets else []) + eval_splits
    if not labelled_splits and not test_splits:
        raise UserError(f"no train, validation or test split in the data (splits: {', '.join(raw_datasets)})")

    first_split = labelled_splits[0] if labelled_splits else test_splits[0]
    first = raw_datasets[first_split]
    if task_name is not None:
        sentence1_key, sentence2_key = task_to_keys[task_name]
    else:
        text_columns = [c for c in first.column_names if c not in ("label", "idx")]
        if "sentence1" in text_columns and "sentence2" in text_columns:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        elif text_columns:
            sentence1_key, sentence2_key = text_columns[0], (text_columns[1] if len(text_columns) > 1 else None)
        else:
            raise UserError(f"no text column in {where(first_split, files)}")
    for split in raw_datasets:
        required = [sentence1_key, sentence2_key] + (["label"] if split in labelled_splits else [])
        eval_data.require_columns(raw_datasets[split], filter(None, required), where(split, files))
        eval_data.require_text_columns(
            raw_datasets[split], filter(None, [sentence1_key, sentence2_key]), where(split, files)
        )
        if "label" in raw_datasets[split].column_names:
            eval_data.require_scalar_column(
                raw_datasets[split],
                "label",
                where(split, files),
                numeric=task_name is not None and task_to_labels[task_name] is None,
            )
        row = eval_data.first_null_row(raw_datasets[split], "label") if split in labelled_splits else None
        if row is not None:
            raise UserError(f"column 'label' in {where(split, files)} has no value in row {row + 1}")

    if task_name is not None:
        label_list = task_to_labels[task_name]
        is_regression = label_list is None
        declared = True  # the classes are the task's, whatever the files hold
    else:
        label_feature = first.features.get("label")
        declared = isinstance(label_feature, datasets.ClassLabel)
        is_regression = getattr(label_feature, "dtype", "") in ("float32", "float64")
        if is_regression:
            label_list = None
        elif isinstance(label_feature, datasets.ClassLabel):
            label_list = label_feature.names
        else:
            label_list = sorted({v for s in labelled_splits for v in raw_datasets[s].unique("label")})
            if not label_list:
                raise UserError("no labelled data to take the label set from: add --train_file or --validation_file")

    # Raw label -> id: ids themselves, or the label names (local files may use either).
    if is_regression:
        num_labels, label_to_id = 1, None
    else:
        num_labels = len(label_list)
        label_to_id = {name: i for i, name in enumerate(label_list)}
        if task_name is not None:
            label_to_id.update({i: i for i in range(num_labels)})
        for split in labelled_splits:
            unknown = [v for v in raw_datasets[split].unique("label") if v not in label_to_id]
            if unknown:
                raise UserError(f"label {unknown[0]!r} in {where(split, files)} is not one of {label_list}")
        eval_data.check_seen_in_training(
            {s: {label_to_id[v] for v in raw_datasets[s].unique("label")} for s in labelled_splits},
            label_list,
            files,
            "label",
            declared=declared,
        )

    # ---- model
    config = eval_common.load_config(model_args)

    names = [str(v) for v in label_list] if label_list is not None else ["score"]
    wanted_label2id = {name: i for i, name in enumerate(names)}
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    default_names = all(k.startswith("LABEL_") for k in config.label2id)
    if trained_head and not model_args.ignore_mismatched_sizes:
        if config.num_labels != num_labels:
            raise UserError(
                f"{model_args.model_name_or_path} has a trained classification head with {config.num_labels} "
                f"labels but the data has {num_labels}; pass --ignore_mismatched_sizes to train a new head"
            )
        if not default_names and not is_regression and config.label2id != wanted_label2id:
            raise UserError(
                f"{model_args.model_name_or_path} was fine-tuned with labels {config.label2id} but the data has "
                f"{wanted_label2id}; pass --ignore_mismatched_sizes to fine-tune it on these labels anyway"
            )
    config.num_labels = num_labels
    config.label2id, config.id2label = wanted_label2id, {i: n for n, i in wanted_label2id.items()}
    config.finetuning_task = task_name
    if is_regression:
        config.problem_type = "regression"

    tokenizer = eval_common.load_tokenizer(model_args)
    eval_common.check_vocab_size(tokenizer, config)
    eval_common.require_pad_token(tokenizer)
    model = eval_common.load_model(
        AutoModelForSequenceClassification,
        model_args,
        config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    max_seq_length = min(data_args.max_seq_length, eval_common.model_input_limit(tokenizer, config))
    if max_seq_length < data_args.max_seq_length:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} exceeds the model's limit; using {max_seq_length}."
        )
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples: dict) -> dict:
        texts = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if "label" in examples:
            # A new name: `map` would keep the raw column's type (e.g. string) for "label".
            result["labels"] = (
                [float(v) for v in examples["label"]]
                if is_regression
                else [label_to_id.get(v, -1) for v in examples["label"]]  # -1: unlabelled test rows
            )
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        processed = DatasetDict(
            {
                split: ds.map(
                    preprocess,
                    batched=True,
                    remove_columns=ds.column_names,
                    num_proc=data_args.preprocessing_num_workers,
                    load_from_cache_file=not data_args.overwrite_cache,
                    desc=f"Tokenizing {split}",
                )
                for split, ds in raw_datasets.items()
            }
        )

    def select(split: str, limit: int | None):
        ds = processed[split]
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds

    train_dataset = select("train", data_args.max_train_samples) if training_args.do_train else None
    eval_datasets = {s: select(s, data_args.max_eval_samples) for s in eval_splits}

    def compute_metrics(p: EvalPrediction) -> dict:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        return eval_metrics.glue_metrics(task_name, preds, p.label_ids, is_regression=is_regression)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_datasets[eval_splits[0]] if eval_splits else None,
        processing_class=tokenizer,
        data_collator=default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )

    # ---- train
    if training_args.do_train:
        eval_common.train_and_save(trainer, last_checkpoint)

    # ---- evaluate
    results = {}
    if training_args.do_eval:
        for split in eval_splits:
            metrics = trainer.evaluate(eval_dataset=eval_datasets[split])
            metrics["eval_samples"] = len(eval_datasets[split])
            results.update({k + eval_split_suffix[split]: v for k, v in metrics.items()})
        trainer.log_metrics("eval", results)
        eval_common.save_metrics(trainer, "eval", results)

    # ---- predict
    if training_args.do_predict:
        for split in test_splits:
            test_dataset = select(split, data_args.max_predict_samples)
            if "labels" in test_dataset.column_names:
                test_dataset = test_dataset.remove_columns("labels")
            preds = trainer.predict(test_dataset, metric_key_prefix="predict").predictions
            preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
            out_file = (
                Path(training_args.output_dir)
                / f"predict_results_{task_name or 'custom'}{test_split_suffix[split]}.txt"
            )
            if trainer.is_world_process_zero():
                with atomic_path(out_file) as tmp, open(tmp, "w") as writer:
                    writer.write("index\tprediction\n")
                    for i, pred in enumerate(preds):
                        writer.write(f"{i}\t{pred:.3f}\n" if is_regression else f"{i}\t{names[pred]}\n")
                logger.info(f"Predictions written to {out_file}")
    return results


if __name__ == "__main__":
    run_cli(main)
