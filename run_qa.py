"""Fine-tune and evaluate a distilled model on extractive question answering (SQuAD or your files).

    python run_qa.py --model_name_or_path ./path_to_your_model/ --tokenizer_name bert-base-uncased \
        --dataset_name squad --do_train --do_eval --per_device_train_batch_size 12 --learning_rate 3e-5 \
        --num_train_epochs 2 --max_seq_length 384 --doc_stride 128 --save_total_limit 1 --output_dir ./qa_results/

`--dataset_name squad` (or `squad_v2` with `--version_2_with_negative`) downloads the data from the
Hugging Face Hub. Offline, give `--train_file/--validation_file/--test_file`: the official SQuAD
json files (train-v1.1.json, dev-v2.0.json, ...) or json/jsonl with one question per row and the
columns id, context, question, answers {"text": [...], "answer_start": [...]} (title optional).
Scores are SQuAD exact match and F1 (v2: also HasAns_* / NoAns_*), written to
`eval_results.json` / `all_results.json`; answers to `eval_predictions.json` and
`eval_nbest_predictions.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import transformers
from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForQuestionAnswering,
    DataCollatorWithPadding,
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
from qa_utils import answer_mismatch, postprocess_qa_predictions, read_squad_json
from utils import UserError, run_cli, write_json

logger = logging.getLogger(__name__)

# Names users type -> the Hub repository that serves them today.
hub_datasets = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}


def load_squad_json(path: str, split: str, cache_dir: str | None) -> Dataset:
    """An official SQuAD file (articles > paragraphs > questions), else a json file of one question per row."""
    rows = read_squad_json(path)
    if rows is not None:
        return Dataset.from_list(rows)
    return load_dataset("json", data_files={split: path}, cache_dir=cache_dir)[split]


LAYOUT_HINT = (
    "expected the official SQuAD layout (data > paragraphs > qas) or one question per row "
    "with id, context, question, answers"
)


def check_questions(dataset: Dataset, source: str, offsets_used: bool) -> None:
    """Raise a `UserError` for a split whose columns cannot be what they claim to be.

    Ids must be unique (answers are matched to questions by id); context and question are text;
    answers, when present, are {"text": [...], "answer_start": [...]}. Where the offsets are used
    (`offsets_used`: the training split), each answer must sit at its answer_start in the context.
    """
    eval_data.require_text_columns(dataset, ["context", "question"], source)
    ids = dataset.data.column("id").to_pylist()
    if None in ids:
        raise UserError(f"column 'id' in {source} has no value in row {ids.index(None) + 1}")
    if len(set(ids)) != len(ids):
        seen = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
        raise UserError(f"question id {duplicate!r} appears more than once in {source}")
    if "answers" not in dataset.column_names:
        return
    answers_type = dataset.data.schema.field("answers").type
    fields = (
        {answers_type.field(i).name: answers_type.field(i).type for i in range(answers_type.num_fields)}
        if pa.types.is_struct(answers_type)
        else {}
    )
    if not (
        {"text", "answer_start"} <= fields.keys()
        and pa.types.is_list(fields["text"])
        and pa.types.is_list(fields["answer_start"])
    ):
        raise UserError(
            f'column \'answers\' in {source} must hold {{"text": [...], "answer_start": [...]}} '
            f"per row, found {eval_data.describe(answers_type)}"
        )
    if offsets_used:
        for row in dataset.select_columns(["id", "context", "answers"]):
            problem = answer_mismatch(row)
            if problem is not None:
                raise UserError(f"question {row['id']!r} in {source}: {problem}")


# File suffix -> the `datasets` loader (or our reader) for it.
file_loaders = {".json": load_squad_json, ".jsonl": "json"}


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set: squad, squad_v2 or another."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data (SQuAD json, or json/jsonl rows)."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (SQuAD json, or json/jsonl rows)."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Questions to answer (answers not needed)."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per feature (question + context window)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens shared by two windows of a long context."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every feature to max_seq_length."})
    n_best_size: int = field(default=20, metadata={"help": "Start and end candidates kept per feature."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    version_2_with_negative: bool = field(default=False, metadata={"help": "Some questions have no answer (SQuAD v2)."})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "Answer null when null score - best span score exceeds this (v2)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training questions."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation questions."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test questions."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo tokenisation instead of using the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse the command line (or one .json file holding the arguments) into the three groups."""
    return eval_common.parse_dataclasses((ModelArguments, DataTrainingArguments, TrainingArguments), argv)


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> tuple[DatasetDict, dict[str, str]]:
    """The raw splits, and for local files the file each split came from (for error messages)."""
    files = eval_data.given_files(data_args, ("train", "validation", "test"))
    if files:
        expected = ".json or .jsonl (SQuAD fields)"
        return eval_data.load_local_files(files, file_loaders, cache_dir, expected), files
    if data_args.dataset_name is None:
        raise UserError("no data: pass --dataset_name (e.g. squad) or --train_file/--validation_file")
    name = hub_datasets.get(data_args.dataset_name, data_args.dataset_name)
    offline_hint = "offline, pass local files with --train_file/--validation_file"
    return eval_data.load_hub_dataset(name, data_args.dataset_config_name, cache_dir, offline_hint), {}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    eval_common.check_run_flags(data_args, training_args)
    for name, least in (("doc_stride", 0), ("n_best_size", 1), ("max_answer_length", 1)):
        if getattr(data_args, name) < least:
            raise UserError(f"--{name} must be at least {least}, got {getattr(data_args, name)}")
    eval_common.check_output_dir(training_args, model_args)
    eval_common.setup_logging(training_args, logger)

    if training_args.eval_strategy != "no":
        raise UserError("run_qa.py scores answers after training only (--do_eval); drop --eval_strategy")
    if data_args.dataset_name == "squad_v2" and not data_args.version_2_with_negative:
        logger.warning("squad_v2 has unanswerable questions: you probably want --version_2_with_negative")

    last_checkpoint = eval_common.detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    # ---- data
    raw_datasets, files = load_raw_datasets(data_args, model_args.cache_dir)
    for flag, split in (("--do_train", "train"), ("--do_eval", "validation"), ("--do_predict", "test")):
        if getattr(training_args, flag[2:]) and split not in raw_datasets:
            raise UserError(f"{flag} needs a {split} split: pass --{split}_file (or --dataset_name with network)")
    for split in raw_datasets:
        required = ["id", "context", "question"] + (["answers"] if split != "test" else [])
        eval_data.require_columns(raw_datasets[split], required, where(split, files), hint=LAYOUT_HINT)
        check_questions(raw_datasets[split], where(split, files), offsets_used=split == "train")
    if training_args.do_train and not data_args.version_2_with_negative:
        unanswered = [
            row["id"] for row in raw_datasets["train"].select_columns(["id", "answers"]) if not row["answers"]["text"]
        ]
        if unanswered:
            raise UserError(
                f"question {unanswered[0]!r} in {where('train', files)} has no answer; "
                "pass --version_2_with_negative for data with unanswerable questions"
            )

    # ---- model
    config = eval_common.load_config(model_args)
    tokenizer = eval_common.load_tokenizer(model_args)
    if not tokenizer.is_fast:
        raise UserError(f"tokenizer {tokenizer.name_or_path} gives no character offsets (not a fast tokenizer)")
    eval_common.check_vocab_size(tokenizer, config)
    eval_common.require_pad_token(tokenizer)
    model = eval_common.load_model(AutoModelForQuestionAnswering, model_args, config)

    max_seq_length = min(data_args.max_seq_length, eval_common.model_input_limit(tokenizer, config))
    if max_seq_length < data_args.max_seq_length:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} exceeds the model's limit; using {max_seq_length}."
        )
    if data_args.doc_stride >= max_seq_length // 2:
        raise UserError(f"--doc_stride {data_args.doc_stride} must be below half of max_seq_length ({max_seq_length})")
    room_needed = tokenizer.num_special_tokens_to_add(pair=True) + data_args.doc_stride
    for split in raw_datasets:
        questions = [q.lstrip() for q in raw_datasets[split]["question"]]
        lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] + room_needed >= max_seq_length:
            raise UserError(
                f"question {raw_datasets[split][longest]['id']!r} in {where(split, files)} is {lengths[longest]} "
                f"tokens long: with max_seq_length {max_seq_length} and --doc_stride {data_args.doc_stride} "
                "no room is left for its context; raise --max_seq_length or lower --doc_stride"
            )
    pad_on_right = tokenizer.padding_side == "right"  # question first, then context
    context_index = 1 if pad_on_right else 0
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(examples: dict) -> transformers.BatchEncoding:
        """Long contexts become several features: windows of the context overlapping by doc_stride."""
        questions = [q.lstrip() for q in examples["question"]]
        pair = (questions, examples["context"]) if pad_on_right else (examples["context"], questions)
        return tokenizer(
            *pair,
            truncation="only_second" if pad_on_right else "only_first",
            max_length=max_seq_length,
            stride=data_args.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=padding,
        )

    def prepare_train_features(examples: dict) -> dict:
        """Label each feature with the answer's first and last token, or CLS when outside the window."""
        encoded = tokenize(examples)
        sample_of = encoded.pop("overflow_to_sample_mapping")
        offsets_of = encoded.pop("offset_mapping")
        encoded["start_positions"], encoded["end_positions"] = [], []
        for i, offsets in enumerate(offsets_of):
            input_ids = encoded["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            answers = examples["answers"][sample_of[i]]
            start = end = cls_index
            if answers["answer_start"]:
                start_char = answers["answer_start"][0]
                end_char = start_char + len(answers["text"][0])
                sequence_ids = encoded.sequence_ids(i)
                context = [k for k, s in enumerate(sequence_ids) if s == context_index]
                if offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
                    start = max(k for k in context if offsets[k][0] <= start_char)
                    end = min(k for k in context if offsets[k][1] >= end_char)
            encoded["start_positions"].append(start)
            encoded["end_positions"].append(end)
        return encoded

    def prepare_eval_features(examples: dict) -> dict:
        """Keep each feature's example id, and offsets for context tokens only (None elsewhere)."""
        encoded = tokenize(examples)
        sample_of = encoded.pop("overflow_to_sample_mapping")
        encoded["example_id"] = []
        for i in range(len(encoded["input_ids"])):
            sequence_ids = encoded.sequence_ids(i)
            encoded["example_id"].append(examples["id"][sample_of[i]])
            encoded["offset_mapping"][i] = [
                o if sequence_ids[k] == context_index else None for k, o in enumerate(encoded["offset_mapping"][i])
            ]
        return encoded

    def examples_of(split: str, limit: int | None) -> Dataset:
        ds = raw_datasets[split]
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds

    def features_of(examples: Dataset, prepare, split: str) -> Dataset:
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            return examples.map(
                prepare,
                batched=True,
                remove_columns=examples.column_names,
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing {split}",
            )

    train_dataset = None
    if training_args.do_train:
        train_dataset = features_of(examples_of("train", data_args.max_train_samples), prepare_train_features, "train")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
    )

    # ---- train
    if training_args.do_train:
        eval_common.train_and_save(trainer, last_checkpoint)

    def answer(split: str, limit: int | None, prefix: str) -> dict:
        """Answer the split's questions; write `{prefix}_predictions.json` etc.; score them if answers are known."""
        examples = examples_of(split, limit)
        features = features_of(examples, prepare_eval_features, split)
        output = trainer.predict(features.remove_columns(["example_id", "offset_mapping"]), metric_key_prefix=prefix)
        start_logits, end_logits = output.predictions[:2]
        predictions, nbest, null_diffs = postprocess_qa_predictions(
            examples,
            features,
            start_logits,
            end_logits,
            version_2_with_negative=data_args.version_2_with_negative,
            n_best_size=data_args.n_best_size,
            max_answer_length=data_args.max_answer_length,
            null_score_diff_threshold=data_args.null_score_diff_threshold,
        )
        metrics = dict(output.metrics, **{f"{prefix}_samples": len(examples)})
        if "answers" in examples.column_names:
            references = {row["id"]: row["answers"]["text"] for row in examples.select_columns(["id", "answers"])}
            scores = (
                eval_metrics.squad_v2_metrics(predictions, references, null_diffs, data_args.null_score_diff_threshold)
                if data_args.version_2_with_negative
                else eval_metrics.squad_metrics(predictions, references)
            )
            metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        if trainer.is_world_process_zero():
            out = Path(training_args.output_dir)
            write_json(predictions, out / f"{prefix}_predictions.json")
            write_json(nbest, out / f"{prefix}_nbest_predictions.json")
            if data_args.version_2_with_negative:
                write_json(null_diffs, out / f"{prefix}_null_odds.json")
        trainer.log_metrics(prefix, metrics)
        eval_common.save_metrics(trainer, prefix, metrics)
        return metrics

    results = answer("validation", data_args.max_eval_samples, "eval") if training_args.do_eval else {}
    if training_args.do_predict:
        answer("test", data_args.max_predict_samples, "predict")
    return results


if __name__ == "__main__":
    run_cli(main)
