"""Fine-tune and evaluate a distilled model on named-entity recognition (CoNLL-2003 or your files).

    python run_ner.py --model_name_or_path ./path_to_your_model/ --tokenizer_name bert-base-uncased \
        --dataset_name conll2003 --do_train --do_eval --output_dir ./ner_results/ --save_total_limit 1

`--dataset_name conll2003` downloads the data from the Hugging Face Hub. Offline, give
`--train_file/--validation_file/--test_file` (json or jsonl, one sentence per row) with a `tokens`
column (list of words) and a `ner_tags` column (list of tags: BIO strings, or ids into
`--label_names`). Scores are seqeval's entity-level precision / recall / F1 and token accuracy,
written to `eval_results.json` / `all_results.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import DatasetDict
from transformers import (
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)

import eval_common
import eval_data
import eval_metrics
from eval_common import ModelArguments
from eval_data import where
from utils import UserError, atomic_path, run_cli

logger = logging.getLogger(__name__)

CONLL2003_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

# Names users type -> the Hub repository that still serves the data without a loading script,
# and the tag names to use when the repository stores bare tag ids.
hub_datasets = {"conll2003": ("lhoestq/conll2003", CONLL2003_TAGS)}

# File suffix -> the `datasets` loader that reads it.
file_loaders = {".json": "json", ".jsonl": "json"}


@dataclass
class NerModelArguments(ModelArguments):
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Use a model whose trained tagging head has other labels: the head is re-initialised."},
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set, e.g. conll2003."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data (json or jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data (json or jsonl)."})
    test_file: str | None = field(default=None, metadata={"help": "Data to predict (json or jsonl)."})
    text_column_name: str = field(default="tokens", metadata={"help": "Column holding the list of words."})
    label_column_name: str = field(default="ner_tags", metadata={"help": "Column holding the list of tags."})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Longer sentences are truncated (default: the model's limit)."}
    )
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every input to max_seq_length."})
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "Tag every sub-word of a word (B- becomes I- after the first), not only the first."},
    )
    return_entity_level_metrics: bool = field(default=False, metadata={"help": "Also report scores per entity type."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training sentences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation sentences."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test sentences."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo tokenisation instead of using the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})


@dataclass
class NerTrainingArguments(TrainingArguments):
    # TrainingArguments' --label_names names the input keys holding labels ("labels" for tagging,
    # found by the Trainer itself); users of the NER script pass the tag names with it.
    label_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tag names in id order, needed when the files hold tag ids: O B-PER I-PER ... (or comma-separated)"
        },
    )


def parse_args(argv: list[str] | None) -> tuple[NerModelArguments, DataTrainingArguments, NerTrainingArguments]:
    """Parse the command line (or one .json file holding the arguments) into the three groups."""
    return eval_common.parse_dataclasses((NerModelArguments, DataTrainingArguments, NerTrainingArguments), argv)


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> tuple[DatasetDict, dict[str, str]]:
    """The raw splits, and for local files the file each split came from (for error messages)."""
    files = eval_data.given_files(data_args, ("train", "validation", "test"))
    if files:
        expected = ".json or .jsonl (lists of words and tags)"
        return eval_data.load_local_files(files, file_loaders, cache_dir, expected), files
    if data_args.dataset_name is None:
        raise UserError("no data: pass --dataset_name (e.g. conll2003) or --train_file/--validation_file")
    name = hub_datasets.get(data_args.dataset_name, (data_args.dataset_name,))[0]
    offline_hint = "offline, pass local files with --train_file/--validation_file"
    return eval_data.load_hub_dataset(name, data_args.dataset_config_name, cache_dir, offline_hint), {}


def check_tagged_words(dataset: datasets.Dataset, text_column: str, label_column: str | None, source: str) -> None:
    """Raise a `UserError` unless each row holds a list of words and (if labelled) as many tags."""
    eval_data.require_list_column(dataset, text_column, source, ("string",))
    if label_column is None:
        return
    eval_data.require_list_column(dataset, label_column, source, ("string", "integer"))
    words = pc.list_value_length(dataset.data.column(text_column))
    tags = pc.list_value_length(dataset.data.column(label_column))
    differ = pc.not_equal(words, tags)
    if pc.any(differ).as_py():
        row = pc.index(differ, True).as_py()
        raise UserError(
            f"row {row + 1} of {source} has {words[row].as_py()} words in '{text_column}' but "
            f"{tags[row].as_py()} tags in '{label_column}'"
        )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    eval_common.check_run_flags(data_args, training_args)
    eval_common.check_output_dir(training_args, model_args)
    tag_names = [name for arg in training_args.label_names or [] for name in arg.split(",") if name]
    training_args.label_names = None
    eval_common.setup_logging(training_args, logger)
    last_checkpoint = eval_common.detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    # ---- data
    raw_datasets, files = load_raw_datasets(data_args, model_args.cache_dir)
    for flag, split in (("--do_train", "train"), ("--do_eval", "validation"), ("--do_predict", "test")):
        if getattr(training_args, flag[2:]) and split not in raw_datasets:
            raise UserError(f"{flag} needs a {split} split: pass --{split}_file (or --dataset_name with network)")
    text_column, label_column = data_args.text_column_name, data_args.label_column_name
    for split in raw_datasets:
        required = [text_column] + ([label_column] if split != "test" else [])
        eval_data.require_columns(
            raw_datasets[split], required, where(split, files), hint="see --text_column_name/--label_column_name"
        )
        check_tagged_words(
            raw_datasets[split],
            text_column,
            label_column if label_column in raw_datasets[split].column_names else None,
            where(split, files),
        )
    labelled_splits = [s for s in raw_datasets if label_column in raw_datasets[s].column_names]

    # Tag names, in id order: the data set's own, --label_names, or the tags the files spell out.
    tag_feature = getattr(raw_datasets[next(iter(raw_datasets))].features.get(label_column), "feature", None)
    tags_by_split = {s: {t for tags in raw_datasets[s][label_column] for t in tags} for s in labelled_splits}
    tags_seen = set().union(*tags_by_split.values())
    declared = True  # by the data set, --label_names or the Hub table; else the files' own tags
    if isinstance(tag_feature, datasets.ClassLabel):
        label_list = tag_feature.names
    elif tag_names:
        label_list = tag_names
    elif data_args.dataset_name in hub_datasets and not files:
        label_list = hub_datasets[data_args.dataset_name][1]
    elif all(isinstance(t, str) for t in tags_seen):
        label_list, declared = sorted(tags_seen), False
    else:
        raise UserError(
            f"the tags in {where(labelled_splits[0], files)} are ids: give their names in id order with --label_names"
        )
    if not label_list:
        raise UserError("the data has no tags: give the tag names in id order with --label_names")
    label_to_id = {name: i for i, name in enumerate(label_list)}
    label_to_id.update({i: i for i in range(len(label_list))})
    for split, tags in tags_by_split.items():
        unknown = sorted(tags - label_to_id.keys(), key=str)
        if unknown:
            raise UserError(f"tag {unknown[0]!r} in {where(split, files)} is not one of the labels {label_list}")
    eval_data.check_seen_in_training(
        {s: {label_to_id[t] for t in tags} for s, tags in tags_by_split.items()}, label_list, files, "tag", declared
    )
    num_labels = len(label_list)
    # With --label_all_tokens, the later pieces of a word get the I- tag of its B- tag.
    b_to_i = [label_to_id.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(label_list)]

    # ---- model
    config = eval_common.load_config(model_args)
    wanted_label2id = {name: i for i, name in enumerate(label_list)}
    trained_head = any(a.endswith("ForTokenClassification") for a in (config.architectures or []))
    default_names = all(k.startswith("LABEL_") for k in config.label2id)
    if trained_head and not model_args.ignore_mismatched_sizes:
        if config.num_labels != num_labels:
            raise UserError(
                f"{model_args.model_name_or_path} has a trained tagging head with {config.num_labels} labels "
                f"but the data has {num_labels}; pass --ignore_mismatched_sizes to train a new head"
            )
        if not default_names and config.label2id != wanted_label2id:
            raise UserError(
                f"{model_args.model_name_or_path} was fine-tuned with tags {config.label2id} but the data has "
                f"{wanted_label2id}; pass --ignore_mismatched_sizes to fine-tune it on these tags anyway"
            )
    config.num_labels = num_labels
    config.label2id, config.id2label = wanted_label2id, dict(enumerate(label_list))
    config.finetuning_task = "ner"

    # Byte-level BPE tokenizers need a leading space to treat pre-split words as words.
    tokenizer_kwargs = {"add_prefix_space": True} if config.model_type in ("gpt2", "roberta") else {}
    tokenizer = eval_common.load_tokenizer(model_args, **tokenizer_kwargs)
    if not tokenizer.is_fast:
        raise UserError(f"tokenizer {tokenizer.name_or_path} has no word alignment (not a fast tokenizer)")
    eval_common.check_vocab_size(tokenizer, config)
    eval_common.require_pad_token(tokenizer)
    model = eval_common.load_model(
        AutoModelForTokenClassification, model_args, config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
    )

    model_limit = eval_common.model_input_limit(tokenizer, config)
    max_seq_length = min(data_args.max_seq_length or model_limit, model_limit)
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize_and_align_labels(examples: dict) -> dict:
        """Tag the first piece of each word; other pieces and special tokens get -100 (ignored).

        Untagged test sentences get tag 0 on first pieces, only to mark where the words start.
        """
        words = examples[text_column]
        encoded = tokenizer(
            words, padding=padding, truncation=True, max_length=max_seq_length, is_split_into_words=True
        )
        all_tags = examples.get(label_column) or [[0] * len(w) for w in words]
        encoded["labels"] = []
        for i, tags in enumerate(all_tags):
            ids, previous = [], None
            for word in encoded.word_ids(batch_index=i):
                if word is None:
                    ids.append(-100)
                elif word != previous:
                    ids.append(label_to_id[tags[word]])
                else:
                    ids.append(b_to_i[label_to_id[tags[word]]] if data_args.label_all_tokens else -100)
                previous = word
            encoded["labels"].append(ids)
        return encoded

    def prepare(split: str, limit: int | None):
        ds = raw_datasets[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            return ds.map(
                tokenize_and_align_labels,
                batched=True,
                remove_columns=ds.column_names,
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing {split}",
            )

    train_dataset = prepare("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = prepare("validation", data_args.max_eval_samples) if "validation" in raw_datasets else None

    def to_tags(predictions: np.ndarray, label_ids: np.ndarray) -> tuple[list[list[str]], list[list[str]]]:
        """Predicted and gold tag names at the positions that carry a gold tag (first word pieces)."""
        pred_tags, gold_tags = [], []
        for pred_row, gold_row in zip(predictions, label_ids, strict=False):
            keep = gold_row != -100
            pred_tags.append([label_list[p] for p in pred_row[keep]])
            gold_tags.append([label_list[g] for g in gold_row[keep]])
        return pred_tags, gold_tags

    def compute_metrics(p: EvalPrediction) -> dict:
        pred_tags, gold_tags = to_tags(np.argmax(p.predictions, axis=2), p.label_ids)
        return eval_metrics.ner_metrics(pred_tags, gold_tags, entity_level=data_args.return_entity_level_metrics)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(
            tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None
        ),
        compute_metrics=compute_metrics,
    )

    # ---- train
    if training_args.do_train:
        eval_common.train_and_save(trainer, last_checkpoint)

    # ---- evaluate
    results = {}
    if training_args.do_eval:
        results = trainer.evaluate()
        results["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", results)
        eval_common.save_metrics(trainer, "eval", results)

    # ---- predict: one line of space-separated tags per sentence
    if training_args.do_predict:
        test_dataset = prepare("test", data_args.max_predict_samples)
        output = trainer.predict(test_dataset, metric_key_prefix="predict")
        if "test" in labelled_splits:
            trainer.log_metrics("predict", output.metrics)
            eval_common.save_metrics(trainer, "predict", output.metrics)
        pred_tags, _ = to_tags(np.argmax(output.predictions, axis=2), output.label_ids)
        if trainer.is_world_process_zero():
            out_file = Path(training_args.output_dir) / "predictions.txt"
            with atomic_path(out_file) as tmp:
                tmp.write_text("".join(" ".join(tags) + "\n" for tags in pred_tags))
            logger.info(f"Predictions written to {out_file}")
    return results


if __name__ == "__main__":
    run_cli(main)
