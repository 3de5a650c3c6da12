"""The evaluation scripts end to end on a tiny model dump and tiny local data, offline, on CPU.

Each script's `main()` runs in-process with a patched argv, like the Hugging Face example tests.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CONLL_TAGS,
    REPO,
    WORDS,
    common_args,
    ner_rows,
    nli_rows,
    qa_rows,
    results,
    run,
    sentiment_rows,
    squad_official_json,
    tiny_config,
    write_csv,
    write_jsonl,
)
from datasets import Dataset, DatasetDict
from transformers import (
    DistilBertForSequenceClassification,
    Trainer,
)

import run_glue
import run_mlm
import run_ner
import run_qa
from qa_utils import postprocess_qa_predictions
from scripts import eval_glue_suite
from utils import UserError

# ---------------------------------------------------------------------------------------------
# run_glue.py

# The original README's evaluation commands, as users type them.
README_COMMANDS = {
    run_mlm: "--model_name_or_path ./path_to_your_model/ --dataset_dir ../path_to_your_data/ "
    "--tokenizer_name bert-base-uncased --do_eval --output_dir /tmp/test-mlm --cache_dir ./distill_cache/",
    run_glue: "--model_name_or_path ./path_to_your_model/ --tokenizer_name bert-base-uncased --task_name sst2 "
    "--do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5 "
    "--num_train_epochs 3 --output_dir ./results/ --save_total_limit 1 --cache_dir ./distill_cache/",
    run_ner: "--model_name_or_path ./path_to_your_model/ --tokenizer_name bert-base-uncased "
    "--dataset_name conll2003 --do_train --do_eval --output_dir ./ner_results/ --save_total_limit 1 "
    "--cache_dir ./distill_cache/",
    run_qa: "--model_name_or_path ./path_to_your_model/ --tokenizer_name bert-base-uncased --dataset_name squad "
    "--do_train --do_eval --per_device_train_batch_size 12 --learning_rate 3e-5 --num_train_epochs 2 "
    "--max_seq_length 384 --doc_stride 128 --save_total_limit 1 --output_dir ./qa_results/",
}


@pytest.mark.parametrize("module", list(README_COMMANDS), ids=lambda m: m.__name__)
def test_readme_commands_parse(module):
    model_args, data_args, training_args = module.parse_args(shlex.split(README_COMMANDS[module]))
    assert model_args.tokenizer_name == "bert-base-uncased" and training_args.do_eval


def test_training_resumes_from_the_last_checkpoint_in_output_dir(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16))
    args = [
        "--model_name_or_path",
        str(dump_dir),
        "--task_name",
        "sst2",
        "--train_file",
        str(train),
        "--do_train",
        "--max_seq_length",
        "16",
    ] + common_args(tmp_path, tokenizer_dir)
    run(run_glue, args + ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"], monkeypatch)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    resumed_from = []
    original_train = Trainer.train

    def spy(self, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    run(run_glue, args + ["--max_steps", "3"], monkeypatch)
    assert resumed_from == [str(tmp_path / "out" / "checkpoint-2")]
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 3


def test_glue_trains_and_evaluates_the_original_dump_format(tmp_path, tokenizer_dir, original_dump_dir, monkeypatch):
    rows = sentiment_rows(40)
    train = write_csv(tmp_path / "sst2" / "train.csv", rows[:32])
    validation = write_csv(tmp_path / "sst2" / "validation.csv", rows[32:])
    run(
        run_glue,
        [
            "--model_name_or_path",
            str(original_dump_dir),
            "--task_name",
            "sst2",
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "16",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert {"eval_accuracy", "eval_loss", "eval_samples"} <= set(results(tmp_path))
    assert "train_loss" in results(tmp_path, "train_results.json")
    assert {"eval_accuracy", "train_loss"} <= set(results(tmp_path, "all_results.json"))


def test_glue_mnli_reports_matched_and_mismatched(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    matched = write_csv(tmp_path / "matched.csv", nli_rows(9))
    mismatched = write_csv(tmp_path / "mismatched.csv", nli_rows(6))
    metrics = run(
        run_glue,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--task_name",
            "mnli",
            "--do_eval",
            "--validation_file",
            str(matched),
            "--validation_mismatched_file",
            str(mismatched),
            "--max_seq_length",
            "16",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert metrics["eval_samples"] == 9 and metrics["eval_samples_mm"] == 6
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results(tmp_path))


def test_glue_custom_files_infer_columns_and_labels(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    rows = [{"review": r["sentence"], "label": ("neg", "pos")[r["label"]]} for r in sentiment_rows(24)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    validation = write_jsonl(tmp_path / "validation.jsonl", rows[16:])
    test = write_jsonl(tmp_path / "test.jsonl", [{"review": r["review"]} for r in rows[16:20]])
    metrics = run(
        run_glue,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--test_file",
            str(test),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--max_seq_length",
            "16",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert "eval_accuracy" in metrics
    predictions = (tmp_path / "out" / "predict_results_custom.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 5
    assert {line.split("\t")[1] for line in predictions[1:]} <= {"neg", "pos"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["label2id"] == {"neg": 0, "pos": 1}


def test_glue_rejects_a_trained_head_with_other_labels(tmp_path, tokenizer_dir, monkeypatch):
    finetuned = tmp_path / "sst2_model"
    DistilBertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(finetuned)
    validation = write_csv(tmp_path / "mnli.csv", nli_rows(6))
    args = [
        "--model_name_or_path",
        str(finetuned),
        "--task_name",
        "mnli",
        "--do_eval",
        "--validation_file",
        str(validation),
    ] + common_args(tmp_path, tokenizer_dir)
    with pytest.raises(UserError, match="2 labels but the data has 3.*--ignore_mismatched_sizes"):
        run(run_glue, args, monkeypatch)
    run(run_glue, args + ["--ignore_mismatched_sizes"], monkeypatch)
    assert "eval_accuracy" in results(tmp_path)


def test_glue_names_the_missing_column_and_its_file(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    validation = write_csv(tmp_path / "sst2.csv", sentiment_rows(4))
    with pytest.raises(UserError, match=r"column 'premise' not found in .*sst2\.csv"):
        run(
            run_glue,
            [
                "--model_name_or_path",
                str(dump_dir),
                "--task_name",
                "mnli",
                "--do_eval",
                "--validation_file",
                str(validation),
            ]
            + common_args(tmp_path, tokenizer_dir),
            monkeypatch,
        )


def test_glue_do_train_without_training_data_is_refused(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    validation = write_csv(tmp_path / "sst2.csv", sentiment_rows(4))
    with pytest.raises(UserError, match="--do_train needs training data"):
        run(
            run_glue,
            [
                "--model_name_or_path",
                str(dump_dir),
                "--task_name",
                "sst2",
                "--do_train",
                "--validation_file",
                str(validation),
            ]
            + common_args(tmp_path, tokenizer_dir),
            monkeypatch,
        )


def test_glue_label_outside_the_task_is_refused(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    validation = write_csv(tmp_path / "rte.csv", [{"sentence1": "the cat", "sentence2": "a cat", "label": "maybe"}])
    with pytest.raises(UserError, match="label 'maybe' in .*rte.csv is not one of"):
        run(
            run_glue,
            [
                "--model_name_or_path",
                str(dump_dir),
                "--task_name",
                "rte",
                "--do_eval",
                "--validation_file",
                str(validation),
            ]
            + common_args(tmp_path, tokenizer_dir),
            monkeypatch,
        )


def test_cli_prints_one_error_line_and_exits_2(tmp_path, dump_dir):
    for script, extra in (
        ("run_glue.py", ["--task_name", "nosuchtask"]),
        ("run_ner.py", ["--train_file", str(tmp_path / "missing.jsonl"), "--do_train"]),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / script),
                "--model_name_or_path",
                str(dump_dir),
                "--output_dir",
                str(tmp_path / "out"),
            ]
            + extra,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "missing.jsonl" in proc.stderr


# ---------------------------------------------------------------------------------------------
# run_ner.py


def test_ner_trains_evaluates_and_predicts_string_tags(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    rows = ner_rows(40)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    validation = write_jsonl(tmp_path / "validation.jsonl", rows[32:])
    test = write_jsonl(tmp_path / "test.jsonl", [{"tokens": r["tokens"]} for r in rows[32:36]])
    run(
        run_ner,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--test_file",
            str(test),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--return_entity_level_metrics",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    metrics = results(tmp_path)
    assert {"eval_precision", "eval_recall", "eval_f1", "eval_accuracy", "eval_PER_f1"} <= set(metrics)
    assert "train_loss" in results(tmp_path, "train_results.json")
    predictions = (tmp_path / "out" / "predictions.txt").read_text().splitlines()
    assert [len(line.split()) for line in predictions] == [len(r["tokens"]) for r in rows[32:36]]


def test_ner_reads_tag_ids_through_label_names(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    rows = [{"tokens": r["tokens"], "ner_tags": [CONLL_TAGS.index(t) for t in r["ner_tags"]]} for r in ner_rows(6)]
    validation = write_jsonl(tmp_path / "validation.jsonl", rows)
    metrics = run(
        run_ner,
        ["--model_name_or_path", str(dump_dir), "--validation_file", str(validation), "--do_eval", "--label_names"]
        + CONLL_TAGS
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert metrics["eval_samples"] == 6 and "eval_f1" in metrics


def test_ner_tag_missing_from_label_names_is_refused(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    validation = write_jsonl(tmp_path / "validation.jsonl", ner_rows(4))
    with pytest.raises(UserError, match="tag 'B-ORG' in .*validation.jsonl is not one of"):
        run(
            run_ner,
            [
                "--model_name_or_path",
                str(dump_dir),
                "--validation_file",
                str(validation),
                "--do_eval",
                "--label_names",
                "O,B-PER,I-PER,B-LOC,I-LOC",
            ]
            + common_args(tmp_path, tokenizer_dir),
            monkeypatch,
        )


# ---------------------------------------------------------------------------------------------
# run_qa.py


def test_qa_trains_and_scores_squad_files(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    rows = qa_rows(30)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:24])
    dev = squad_official_json(tmp_path / "dev-v1.1.json", rows[24:])
    run(
        run_qa,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--train_file",
            str(train),
            "--validation_file",
            str(dev),
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "32",
            "--doc_stride",
            "8",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert {"eval_exact_match", "eval_f1", "eval_samples"} <= set(results(tmp_path))
    assert "train_loss" in results(tmp_path, "all_results.json")
    predictions = json.loads((tmp_path / "out" / "eval_predictions.json").read_text())
    assert set(predictions) == {r["id"] for r in rows[24:]}
    nbest = json.loads((tmp_path / "out" / "eval_nbest_predictions.json").read_text())
    assert all(answers[0]["text"] == predictions[q] for q, answers in nbest.items())


def test_qa_version_2_scores_unanswerable_questions(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    dev = write_jsonl(tmp_path / "dev.jsonl", qa_rows(6, unanswerable=True))
    metrics = run(
        run_qa,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--validation_file",
            str(dev),
            "--do_eval",
            "--version_2_with_negative",
            "--max_seq_length",
            "32",
            "--doc_stride",
            "8",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert {"eval_exact", "eval_f1", "eval_HasAns_exact", "eval_NoAns_exact", "eval_best_f1"} <= set(metrics)
    assert metrics["eval_NoAns_total"] == 2 and metrics["eval_HasAns_total"] == 4
    assert (tmp_path / "out" / "eval_null_odds.json").is_file()


def test_qa_training_question_without_answer_needs_version_2(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(6, unanswerable=True))
    with pytest.raises(UserError, match="question 'q0' in .*train.jsonl has no answer"):
        run(
            run_qa,
            ["--model_name_or_path", str(dump_dir), "--train_file", str(train), "--do_train"]
            + common_args(tmp_path, tokenizer_dir),
            monkeypatch,
        )


def test_postprocessing_maps_logits_back_to_context_text():
    context = "john lives in paris"
    # [CLS] where does john live ? [SEP] john lives in paris [SEP]
    offsets = [None] * 7 + [(0, 4), (5, 10), (11, 13), (14, 19), None]
    start, end = np.zeros((1, 12)), np.zeros((1, 12))
    start[0, 10], end[0, 10] = 5.0, 5.0  # "paris"
    start[0, 4], end[0, 4] = 9.0, 9.0  # a question token: never an answer
    examples, features = [{"id": "q", "context": context}], [{"example_id": "q", "offset_mapping": offsets}]
    predictions, nbest, _ = postprocess_qa_predictions(examples, features, start, end, n_best_size=3)
    assert predictions == {"q": "paris"} and nbest["q"][0]["offsets"] == [14, 19]
    start[0, 7], end[0, 10] = 6.0, 7.0  # "john lives in paris" is 4 tokens
    assert postprocess_qa_predictions(examples, features, start, end)[0] == {"q": "john lives in paris"}
    assert postprocess_qa_predictions(examples, features, start, end, max_answer_length=3)[0] == {"q": "paris"}
    start[0, 0], end[0, 0] = 20.0, 20.0  # CLS: the null answer
    predictions, _, null_diffs = postprocess_qa_predictions(
        examples, features, start, end, version_2_with_negative=True
    )
    assert predictions == {"q": ""} and null_diffs["q"] == pytest.approx(40.0 - 13.0)


# ---------------------------------------------------------------------------------------------
# run_mlm.py


def mlm_texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 15)))) for _ in range(n)]


def test_mlm_trains_and_evaluates_a_saved_dataset_dict(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    texts = mlm_texts(60)
    DatasetDict(
        train=Dataset.from_dict({"text": texts[:48]}), validation=Dataset.from_dict({"text": texts[48:]})
    ).save_to_disk(tmp_path / "data")
    run(
        run_mlm,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--dataset_dir",
            str(tmp_path / "data"),
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "16",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    metrics = results(tmp_path)
    assert {"eval_loss", "eval_accuracy", "perplexity"} <= set(metrics)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["eval_loss"]), rel=1e-4)
    assert "train_loss" in results(tmp_path, "train_results.json")


def test_mlm_evaluates_a_saved_dataset_line_by_line(tmp_path, tokenizer_dir, original_dump_dir, monkeypatch):
    Dataset.from_dict({"text": mlm_texts(12) + ["", "  "]}).save_to_disk(tmp_path / "data")
    metrics = run(
        run_mlm,
        [
            "--model_name_or_path",
            str(original_dump_dir),
            "--dataset_dir",
            str(tmp_path / "data"),
            "--do_eval",
            "--line_by_line",
            "--mlm_probability",
            "0.3",
        ]
        + common_args(tmp_path, tokenizer_dir),
        monkeypatch,
    )
    assert metrics["eval_samples"] == 12  # blank lines dropped
    assert metrics["perplexity"] > 1.0


def test_mlm_reads_the_tokenizer_from_the_model_folder(tmp_path, tiny_bert_teacher, monkeypatch):
    """A BertForMaskedLM folder with the real bert-base-uncased tokenizer in it (no --tokenizer_name)."""
    validation = write_jsonl(tmp_path / "valid.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    metrics = run(
        run_mlm,
        [
            "--model_name_or_path",
            str(tiny_bert_teacher),
            "--validation_file",
            str(validation),
            "--do_eval",
            "--line_by_line",
        ]
        + common_args(tmp_path, None),
        monkeypatch,
    )
    assert metrics["eval_samples"] == 8 and "eval_accuracy" in metrics


def test_mlm_names_a_missing_text_column(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    validation = write_jsonl(tmp_path / "valid.jsonl", [{"body": t} for t in mlm_texts(4)])
    with pytest.raises(UserError, match=r"column 'content' not found in .*valid\.jsonl"):
        run(
            run_mlm,
            [
                "--model_name_or_path",
                str(dump_dir),
                "--validation_file",
                str(validation),
                "--do_eval",
                "--text_column_name",
                "content",
            ]
            + common_args(tmp_path, tokenizer_dir),
            monkeypatch,
        )


# ---------------------------------------------------------------------------------------------
# scripts/eval_glue_suite.py


def test_glue_suite_compares_two_models_on_two_tasks(tmp_path, tokenizer_dir, dump_dir, original_dump_dir, capsys):
    rows = sentiment_rows(24)
    write_csv(tmp_path / "glue" / "sst2" / "train.csv", rows[:16])
    write_csv(tmp_path / "glue" / "sst2" / "validation.csv", rows[16:])
    sts = [
        {
            "sentence1": "the cat sat",
            "sentence2": f"the {('cat', 'dog')[i % 2]} sat",
            "label": 4.0 * (i % 2 == 0) + i / 10,
        }
        for i in range(24)
    ]
    write_csv(tmp_path / "glue" / "stsb" / "train.csv", sts[:16])
    write_csv(tmp_path / "glue" / "stsb" / "validation.csv", sts[16:])
    table = eval_glue_suite.main(
        [
            "--model",
            f"DIITO={dump_dir}",
            "--model",
            f"DistilBERT={original_dump_dir}",
            "--tasks",
            "stsb",
            "sst2",
            "--glue_dir",
            str(tmp_path / "glue"),
            "--tokenizer_name",
            str(tokenizer_dir),
            "--output_dir",
            str(tmp_path / "suite"),
            "--max_seq_length",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--max_steps",
            "2",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "| Model | Average-score | SST-2 | STS-B |"
    assert lines[2].startswith("| DIITO | **") and lines[3].startswith("| DistilBERT | **")
    assert table in capsys.readouterr().out
    assert (tmp_path / "suite" / "glue_results.md").read_text() == table
    saved = json.loads((tmp_path / "suite" / "glue_results.json").read_text())
    assert "eval_spearmanr" in saved["metrics"]["DIITO"]["stsb"]
    assert (tmp_path / "suite" / "DistilBERT" / "sst2" / "eval_results.json").is_file()


def test_glue_suite_table_format():
    table = eval_glue_suite.format_table(
        {"DIITO": {"sst2": 90.0, "cola": 50.0}, "DistilBERT": {"sst2": 80.0, "cola": None}}, ["sst2", "cola"]
    )
    assert table.splitlines() == [
        "| Model | Average-score | CoLA | SST-2 |",
        "| :---: | :---: | :---: | :---: |",
        "| DIITO | **70.00** | 50.00 | 90.00 |",
        "| DistilBERT | **80.00** | (-) | 80.00 |",
    ]
    assert eval_glue_suite.task_score("mrpc", {"eval_f1": 0.9, "eval_accuracy": 0.8}) == pytest.approx(85.0)


def test_glue_suite_checks_the_glue_dir_before_training(tmp_path):
    write_csv(tmp_path / "glue" / "sst2" / "train.csv", sentiment_rows(4))
    with pytest.raises(UserError, match="no validation file for sst2"):
        eval_glue_suite.main(
            [
                "--model",
                "x=/nowhere",
                "--tasks",
                "sst2",
                "--glue_dir",
                str(tmp_path / "glue"),
                "--output_dir",
                str(tmp_path / "suite"),
            ]
        )


# ---------------------------------------------------------------------------------------------
# TensorBoard by default


def tensorboard_scalars(output_dir: Path) -> set[str]:
    """Tags of the scalars in the event files under output_dir/runs/ (empty if there are none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in output_dir.glob("runs/*/events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_scripts_log_to_tensorboard_unless_report_to_says_otherwise(tmp_path, tokenizer_dir, dump_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    rows = sentiment_rows(24)
    train = write_csv(tmp_path / "train.csv", rows[:16])
    validation = write_csv(tmp_path / "validation.csv", rows[16:])
    args = [
        "--model_name_or_path",
        str(dump_dir),
        "--task_name",
        "sst2",
        "--train_file",
        str(train),
        "--validation_file",
        str(validation),
        "--do_train",
        "--do_eval",
        "--max_seq_length",
        "16",
        "--logging_steps",
        "1",
    ]
    default = [a for a in common_args(tmp_path, tokenizer_dir) if a not in ("--report_to", "none")]
    run(run_glue, args + default, monkeypatch)
    assert {"train/loss", "eval/accuracy"} <= tensorboard_scalars(tmp_path / "out")

    quiet = tmp_path / "quiet"
    run(run_glue, args + default + ["--output_dir", str(quiet / "out"), "--report_to", "none"], monkeypatch)
    assert (quiet / "out" / "eval_results.json").is_file() and not (quiet / "out" / "runs").exists()


def test_report_to_default_is_tensorboard_only_when_not_given(tmp_path):
    pytest.importorskip("tensorboard")
    base = ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--do_eval"]
    assert run_mlm.parse_args(base)[2].report_to == ["tensorboard"]
    assert run_mlm.parse_args(base + ["--report_to", "none"])[2].report_to == []
    assert run_mlm.parse_args(base + ["--report_to=none"])[2].report_to == []
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"model_name_or_path": "m", "output_dir": str(tmp_path), "report_to": "none"}))
    assert run_mlm.parse_args([str(args_file)])[2].report_to == []
    args_file.write_text(json.dumps({"model_name_or_path": "m", "output_dir": str(tmp_path)}))
    assert run_mlm.parse_args([str(args_file)])[2].report_to == ["tensorboard"]
