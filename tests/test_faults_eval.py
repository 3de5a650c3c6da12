"""Fault injection for the evaluation scripts: every bad input ends in one `error:` line and exit 2.

Each case hands a script one fault (malformed or unreadable data, a model folder missing a part,
an output folder that cannot be written, flags that cannot work) and checks what the user sees:
exit status 2, one `error: ...` line naming the problem and the file or flag, no traceback, and
no output folder half-written. Most cases run in-process through `utils.run_cli`, as the CLI does;
permission faults run the CLI in a subprocess (as root, with the capabilities that bypass file
permissions dropped, so that permission bits apply).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    common_args,
    ner_rows,
    nli_rows,
    qa_rows,
    sentiment_rows,
    squad_official_json,
    write_csv,
    write_jsonl,
)

import run_glue
import run_mlm
import run_ner
import run_qa
from utils import run_cli

QA_SHAPE = ["--max_seq_length", "32", "--doc_stride", "8"]


def cli(module, args: list[str], capsys) -> tuple[int, str]:
    """Run `module.main(args)` the way its CLI does: (exit status, the last line on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: module.main(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err.strip().splitlines()[-1]


def assert_refused(status: int, line: str, *fragments: str) -> None:
    assert status == 2, line
    assert line.startswith("error: ") and "\n" not in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


# ---------------------------------------------------------------------------------------------
# Malformed data: (script, file name, file content, extra flags, fragments of the message)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _ner(change) -> str:
    rows = ner_rows(4)
    change(rows)
    return _jsonl(rows)


def _qa(change) -> str:
    rows = qa_rows(4)
    change(rows)
    return _jsonl(rows)


MALFORMED = {
    "truncated_jsonl": (
        run_glue,
        "v.jsonl",
        '{"sentence": "a", "label": 0}\n{"sentence": ',
        [],
        ["cannot read", "JSON parse error"],
    ),
    "empty_csv": (run_glue, "v.csv", "", [], ["is empty"]),
    "header_only_csv": (run_glue, "v.csv", "sentence,label\n", [], ["holds no rows"]),
    "ragged_csv": (
        run_glue,
        "v.csv",
        "sentence,label\nthe cat,1\nthe dog,0,2,3\n",
        [],
        ["cannot read", "Expected 2 fields in line 3"],
    ),
    "numbers_as_text": (
        run_glue,
        "v.jsonl",
        _jsonl([{"sentence": 5, "label": 0}]),
        [],
        ["column 'sentence'", "must hold text, found integers"],
    ),
    "missing_text": (
        run_glue,
        "v.jsonl",
        _jsonl([{"sentence": "a", "label": 0}, {"sentence": None, "label": 1}]),
        [],
        ["column 'sentence'", "no value in row 2"],
    ),
    "list_labels": (
        run_glue,
        "v.jsonl",
        _jsonl([{"sentence": "a", "label": [0]}]),
        [],
        ["column 'label'", "found lists"],
    ),
    "mixed_labels": (
        run_glue,
        "v.jsonl",
        '{"sentence": "a", "label": 0}\n{"sentence": "b", "label": "x"}\n',
        [],
        ["column 'label'", "mixed types"],
    ),
    "text_regression_labels": (
        run_glue,
        "v.jsonl",
        _jsonl([{"sentence1": "a", "sentence2": "b", "label": "high"}]),
        ["--task_name", "stsb"],
        ["column 'label'", "must hold a number"],
    ),
    "ner_tags_shorter": (
        run_ner,
        "v.jsonl",
        _ner(lambda r: r[1]["ner_tags"].pop()),
        [],
        ["row 2 of", "4 words in 'tokens' but 3 tags in 'ner_tags'"],
    ),
    "ner_tags_longer": (run_ner, "v.jsonl", _ner(lambda r: r[1]["ner_tags"].append("O")), [], ["row 2 of", "5 tags"]),
    "ner_sentence_as_string": (
        run_ner,
        "v.jsonl",
        _jsonl([{"tokens": "john lives in paris", "ner_tags": ["O"]}]),
        [],
        ["column 'tokens'", "must hold a list of strings per row, found text"],
    ),
    "ner_missing_tags": (
        run_ner,
        "v.jsonl",
        _ner(lambda r: r[2].update(ner_tags=None)),
        [],
        ["column 'ner_tags'", "row 3"],
    ),
    "squad_without_qas": (
        run_qa,
        "dev.json",
        json.dumps({"data": [{"paragraphs": [{"context": "abc"}]}]}),
        QA_SHAPE,
        ["cannot read", "data[0].paragraphs[0] has no 'qas'"],
    ),
    "squad_answer_without_start": (
        run_qa,
        "dev.json",
        json.dumps(
            {
                "data": [
                    {
                        "paragraphs": [
                            {"context": "abc", "qas": [{"id": "1", "question": "q", "answers": [{"text": "b"}]}]}
                        ]
                    }
                ]
            }
        ),
        QA_SHAPE,
        ["data[0].paragraphs[0].qas[0].answers[0] has no 'answer_start'"],
    ),
    "not_squad_at_all": (
        run_qa,
        "dev.json",
        json.dumps({"version": "1.1", "articles": []}),
        QA_SHAPE,
        ["column 'id' not found", "official SQuAD layout"],
    ),
    "duplicate_question_ids": (
        run_qa,
        "dev.jsonl",
        _qa(lambda r: r[1].update(id=r[0]["id"])),
        QA_SHAPE,
        ["question id 'q0' appears more than once"],
    ),
    "answers_without_start": (
        run_qa,
        "dev.jsonl",
        _qa(lambda r: [x.update(answers={"text": x["answers"]["text"]}) for x in r]),
        QA_SHAPE,
        ["column 'answers'"],
    ),
    "missing_context": (
        run_qa,
        "dev.jsonl",
        _qa(lambda r: r[1].update(context=None)),
        QA_SHAPE,
        ["column 'context'", "no value in row 2"],
    ),
    "mlm_numbers_as_text": (run_mlm, "v.jsonl", '{"text": 5}\n', [], ["column 'text'", "must hold text"]),
    "mlm_not_utf8": (run_mlm, "v.txt", b"\xff\xfe bad bytes\n", ["--line_by_line"], ["cannot read", "utf-8"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_evaluation_data_is_refused_in_one_line(case, tmp_path, tokenizer_dir, dump_dir, capsys):
    module, name, content, extra, fragments = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    task = ["--task_name", "sst2"] if module is run_glue and "--task_name" not in extra else []
    status, line = cli(
        module,
        ["--model_name_or_path", str(dump_dir), "--validation_file", str(path), "--do_eval"]
        + task
        + extra
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(status, line, name, *fragments)
    assert not (tmp_path / "out").exists()


def test_answers_away_from_their_offsets_are_refused_for_training(tmp_path, tokenizer_dir, dump_dir, capsys):
    rows = qa_rows(6)
    rows[2]["answers"]["answer_start"] = [3]
    train = squad_official_json(tmp_path / "train-v1.1.json", rows)
    status, line = cli(
        run_qa,
        ["--model_name_or_path", str(dump_dir), "--train_file", str(train), "--do_train"]
        + QA_SHAPE
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(
        status, line, "question 'q2'", "train-v1.1.json", f"{rows[2]['answers']['text'][0]!r} is not at character 3"
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Missing or broken model parts


def copy_dump(dump_dir: Path, dst: Path, *without: str) -> Path:
    shutil.copytree(dump_dir, dst)
    for name in without:
        (dst / name).unlink()
    return dst


def test_a_nonexistent_model_folder_is_called_a_folder(tmp_path, tokenizer_dir, capsys):
    validation = write_csv(tmp_path / "v.csv", sentiment_rows(4))
    for missing in ("./no_such_model/", str(tmp_path / "no_such_model")):
        status, line = cli(
            run_glue,
            ["--model_name_or_path", missing, "--task_name", "sst2", "--do_eval", "--validation_file", str(validation)]
            + common_args(tmp_path, tokenizer_dir),
            capsys,
        )
        assert_refused(status, line, "--model_name_or_path folder not found", missing)
        assert "Repo id" not in line
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_config_json_is_named(tmp_path, tokenizer_dir, dump_dir, capsys):
    folder = copy_dump(dump_dir, tmp_path / "model", "config.json")
    validation = write_csv(tmp_path / "v.csv", sentiment_rows(4))
    status, line = cli(
        run_glue,
        ["--model_name_or_path", str(folder), "--task_name", "sst2", "--do_eval", "--validation_file", str(validation)]
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(status, line, f"no config.json in {folder}")
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_tokenizer_asks_for_tokenizer_name(tmp_path, dump_dir, capsys):
    """transformers 5 would build an empty-vocabulary tokenizer from it: every word [UNK]."""
    validation = write_jsonl(tmp_path / "v.jsonl", ner_rows(4))
    status, line = cli(
        run_ner,
        ["--model_name_or_path", str(dump_dir), "--validation_file", str(validation), "--do_eval"]
        + common_args(tmp_path, None),
        capsys,
    )
    assert_refused(status, line, f"no tokenizer files in {dump_dir}", "--tokenizer_name")
    assert not (tmp_path / "out").exists()


def test_a_distillation_run_folder_suggests_its_teachers_tokenizer(tmp_path, dump_dir, capsys):
    run_folder = copy_dump(dump_dir, tmp_path / "run")
    (run_folder / "parameters.json").write_text(json.dumps({"teacher_name": "bert-base-uncased", "n_epoch": 3}))
    validation = write_jsonl(tmp_path / "v.jsonl", [{"text": "the cat sat on the mat"}] * 4)
    status, line = cli(
        run_mlm,
        ["--model_name_or_path", str(run_folder), "--validation_file", str(validation), "--do_eval"]
        + common_args(tmp_path, None),
        capsys,
    )
    assert_refused(
        status,
        line,
        f"no tokenizer files in {run_folder}",
        "distillation run folder",
        "--tokenizer_name bert-base-uncased",
    )
    assert not (tmp_path / "out").exists()


class Payload:
    """Pickled into a weights file: unpickling it would create a folder (code running from a checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("fault", ["no_weights", "garbage_safetensors", "pickle_payload", "wrong_shape"])
def test_broken_model_weights_are_refused(fault, tmp_path, tokenizer_dir, dump_dir, capsys):
    folder = copy_dump(dump_dir, tmp_path / "model", "model.safetensors")
    marker = tmp_path / "payload_ran"
    expected = {
        "no_weights": "no file named model.safetensors",
        "garbage_safetensors": "cannot load model",
        "pickle_payload": "corrupt or holds more than tensors",
        "wrong_shape": "does not have the shape",
    }[fault]
    if fault == "garbage_safetensors":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    elif fault == "pickle_payload":
        torch.save({"distilbert.embeddings.word_embeddings.weight": Payload(marker)}, folder / "pytorch_model.bin")
    elif fault == "wrong_shape":
        from safetensors.torch import load_file, save_file

        state = load_file(dump_dir / "model.safetensors")
        name = next(k for k in state if k.endswith("q_lin.weight"))
        state[name] = torch.zeros(3, 3)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    validation = write_jsonl(tmp_path / "v.jsonl", [{"text": "the cat sat on the mat"}] * 4)
    status, line = cli(
        run_mlm,
        ["--model_name_or_path", str(folder), "--validation_file", str(validation), "--do_eval"]
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(status, line, f"cannot load model {folder}", expected)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Flags that cannot work, refused before any work

FLAGS = {
    "nothing_to_do": (run_glue, [], "nothing to do: pass --do_train, --do_eval or --do_predict"),
    "zero_eval_samples": (run_glue, ["--do_eval", "--max_eval_samples", "0"], "--max_eval_samples must be at least 1"),
    "zero_max_seq_length": (run_ner, ["--do_eval", "--max_seq_length", "0"], "--max_seq_length must be at least 1"),
    "missing_resume_folder": (
        run_glue,
        ["--do_train", "--resume_from_checkpoint", "/nowhere/checkpoint-9"],
        "--resume_from_checkpoint folder not found: /nowhere/checkpoint-9",
    ),
    "negative_doc_stride": (run_qa, ["--do_eval", "--doc_stride", "-1"], "--doc_stride must be at least 0"),
    "no_candidates": (run_qa, ["--do_eval", "--n_best_size", "0"], "--n_best_size must be at least 1"),
    "mlm_predict": (run_mlm, ["--do_predict"], "run_mlm.py has no --do_predict"),
    "mlm_all_held_out": (
        run_mlm,
        ["--do_train", "--validation_split_percentage", "100"],
        "--validation_split_percentage must be between 1 and 99",
    ),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_impossible_flags_are_refused_before_any_work(case, tmp_path, capsys):
    module, flags, fragment = FLAGS[case]
    status, line = cli(
        module,
        ["--model_name_or_path", str(tmp_path / "never_read"), "--output_dir", str(tmp_path / "out")] + flags,
        capsys,
    )
    assert_refused(status, line, fragment)
    assert not (tmp_path / "out").exists()


def test_an_output_dir_below_a_file_is_refused_before_loading(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder's parent should be")
    status, line = cli(
        run_glue,
        ["--model_name_or_path", str(tmp_path / "never_read"), "--do_eval", "--output_dir", str(blocker / "sst2")],
        capsys,
    )
    assert_refused(status, line, f"--output_dir {blocker / 'sst2'} cannot be created", f"{blocker} is not a folder")
    assert blocker.read_text().startswith("a file")


# ---------------------------------------------------------------------------------------------
# Permissions: the CLI in a subprocess, where permission bits apply even to root


def permission_prefix() -> list[str]:
    """A command prefix under which file permissions apply ([] for a normal user)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        permission_prefix() + [sys.executable, str(REPO / script)] + args,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )


def assert_cli_refused(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_refused(proc.returncode, proc.stderr.strip().splitlines()[-1], *fragments)


def test_permission_faults_name_the_file_and_the_cause(tmp_path, tokenizer_dir, dump_dir):
    validation = write_csv(tmp_path / "v.csv", sentiment_rows(8))
    base = ["--model_name_or_path", str(dump_dir), "--task_name", "sst2", "--do_eval"]

    # An output folder in a read-only parent: refused before the model is loaded; nothing created.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    (read_only / "keep.txt").write_text("user file")
    read_only.chmod(0o555)
    try:
        proc = run_script(
            "run_glue.py",
            base
            + ["--validation_file", str(validation)]
            + common_args(tmp_path, tokenizer_dir)
            + ["--output_dir", str(read_only / "sst2")],
            tmp_path,
        )
    finally:
        read_only.chmod(0o755)
    assert_cli_refused(proc, f"--output_dir {read_only / 'sst2'} cannot be written", "Permission denied")
    assert [p.name for p in read_only.iterdir()] == ["keep.txt"]

    # An unreadable data file: the file and the cause, not "An error occurred while generating the dataset".
    validation.chmod(0)
    try:
        proc = run_script(
            "run_glue.py",
            base + ["--validation_file", str(validation)] + common_args(tmp_path, tokenizer_dir),
            tmp_path,
        )
    finally:
        validation.chmod(0o644)
    assert_cli_refused(proc, f"cannot read {validation}: Permission denied")
    assert not (tmp_path / "out").exists()

    # An unreadable config.json in the model folder.
    folder = copy_dump(dump_dir, tmp_path / "model")
    (folder / "config.json").chmod(0)
    proc = run_script(
        "run_glue.py",
        ["--model_name_or_path", str(folder)]
        + base[2:]
        + ["--validation_file", str(validation)]
        + common_args(tmp_path, tokenizer_dir),
        tmp_path,
    )
    assert_cli_refused(proc, f"cannot load a model config from {folder}", "Permission denied")
    assert not (tmp_path / "out").exists()


def test_glue_suite_checks_models_and_outputs_before_any_training(tmp_path, dump_dir, capsys):
    from scripts import eval_glue_suite

    write_csv(tmp_path / "glue" / "sst2" / "train.csv", sentiment_rows(4))
    write_csv(tmp_path / "glue" / "sst2" / "validation.csv", sentiment_rows(4))
    base = ["--tasks", "sst2", "--glue_dir", str(tmp_path / "glue"), "--output_dir", str(tmp_path / "suite")]
    status, line = cli(eval_glue_suite, base + ["--model", f"A={dump_dir}", "--model", "B=./typo/"], capsys)
    assert_refused(status, line, "--model B folder not found: ./typo/")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    status, line = cli(
        eval_glue_suite, base + ["--model", f"A={dump_dir}", "--results_file", str(blocker / "t.md")], capsys
    )
    assert_refused(status, line, "--results_file's folder", f"{blocker} is not a folder")
    assert not (tmp_path / "suite").exists()


# ---------------------------------------------------------------------------------------------
# Hardening, round 2: broken model folders name the file


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _as_pytorch_bin(folder: Path) -> Path:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder / "pytorch_model.bin"


MODEL_FOLDER_FAULTS = {
    "declared_field_as_text": (lambda f: _edit_config(f, n_layers="4"), "config.json", "'n_layers' expected int"),
    "alias_field_as_text": (
        lambda f: _edit_config(f, num_hidden_layers="4"),
        "config.json",
        "'num_hidden_layers' must be a positive integer, got '4'",
    ),
    "config_not_json": (
        lambda f: (f / "config.json").write_text('{"model_type": "distilbert", '),
        "config.json",
        "not valid JSON",
    ),
    "config_a_list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json", "must hold a JSON object"),
    "safetensors_cut_in_half": (lambda f: _cut_in_half(f / "model.safetensors"), "model.safetensors", "truncated"),
    "pytorch_bin_cut_in_half": (lambda f: _cut_in_half(_as_pytorch_bin(f)), "pytorch_model.bin", "truncated"),
    "tokenizer_json_broken": (
        lambda f: (f / "tokenizer.json").write_text('{"version": '),
        "tokenizer.json",
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_FOLDER_FAULTS))
def test_a_broken_model_folder_names_the_broken_file(case, tmp_path, tokenizer_dir, dump_dir, capsys):
    folder = copy_dump(dump_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    break_it, file_name, fragment = MODEL_FOLDER_FAULTS[case]
    break_it(folder)
    validation = write_jsonl(tmp_path / "v.jsonl", [{"text": "the cat sat on the mat"}] * 4)
    status, line = cli(
        run_mlm,
        ["--model_name_or_path", str(folder), "--validation_file", str(validation), "--do_eval"]
        + common_args(tmp_path, None),
        capsys,
    )
    assert_refused(status, line, str(folder / file_name), fragment)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_padding_token_is_refused(tmp_path, dump_dir, capsys):
    from conftest import VOCAB
    from transformers import BertTokenizer

    folder = tmp_path / "no_pad"
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, pad_token=None).save_pretrained(folder)
    validation = write_csv(tmp_path / "v.csv", sentiment_rows(4))
    status, line = cli(
        run_glue,
        [
            "--model_name_or_path",
            str(dump_dir),
            "--task_name",
            "sst2",
            "--do_eval",
            "--validation_file",
            str(validation),
        ]
        + common_args(tmp_path, folder),
        capsys,
    )
    assert_refused(status, line, f"tokenizer {folder} has no padding token")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Run folders are owned: no script writes where it reads a model, nor into a distillation run


def distillation_run(dump_dir: Path, tokenizer_dir: Path, folder: Path) -> Path:
    """A run folder as causal_train.py leaves it: marker, final student, tokenizer, a checkpoint-<step>/."""
    import eval_common

    copy_dump(dump_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    (folder / eval_common.RUN_MARKER).write_text("A run folder of causal_train.py (DIITO). --force may replace it.\n")
    shutil.copytree(folder, folder / "checkpoint-4", ignore=shutil.ignore_patterns(eval_common.RUN_MARKER))
    return folder


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case", ["output_is_the_model", "output_in_the_run", "model_inside_output", "resume_a_distillation_checkpoint"]
)
def test_a_distillation_run_folder_is_never_written_by_fine_tuning(case, tmp_path, tokenizer_dir, dump_dir, capsys):
    run = distillation_run(dump_dir, tokenizer_dir, tmp_path / "run")
    before = _snapshot(run)
    model, output, extra, fragments = {
        "output_is_the_model": (run, run, [], ["is the folder --model_name_or_path reads from"]),
        "output_in_the_run": (run, run / "glue", [], ["inside the distillation run folder", ".causal_train_run"]),
        "model_inside_output": (run / "checkpoint-4", run, [], ["lies inside --output_dir", "deletes checkpoints"]),
        "resume_a_distillation_checkpoint": (
            run,
            tmp_path / "out",
            ["--resume_from_checkpoint", str(run / "checkpoint-4")],
            ["is not a Trainer checkpoint (no trainer_state.json)", "--model_name_or_path"],
        ),
    }[case]
    data = write_csv(tmp_path / "d.csv", sentiment_rows(8))
    status, line = cli(
        run_glue,
        ["--model_name_or_path", str(model), "--task_name", "sst2", "--do_train", "--do_eval"]
        + ["--train_file", str(data), "--validation_file", str(data)]
        + common_args(tmp_path, None)
        + ["--output_dir", str(output)]
        + extra,
        capsys,
    )
    assert_refused(status, line, *fragments, "--output_dir" if case != "resume_a_distillation_checkpoint" else "")
    assert _snapshot(run) == before
    assert not (run / "glue").exists() and not (tmp_path / "out").exists()


def test_checkpoints_without_trainer_state_are_not_resumed_from(tmp_path, tokenizer_dir, dump_dir, capsys):
    """A copied run without its marker: its checkpoint-<step>/ is no Trainer checkpoint, and training is refused."""
    import eval_common

    output = distillation_run(dump_dir, tokenizer_dir, tmp_path / "copied_run")
    (output / eval_common.RUN_MARKER).unlink()
    before = _snapshot(output)
    data = write_csv(tmp_path / "d.csv", sentiment_rows(8))
    status, line = cli(
        run_glue,
        ["--model_name_or_path", str(dump_dir), "--task_name", "sst2", "--do_train", "--train_file", str(data)]
        + common_args(tmp_path, tokenizer_dir)
        + ["--output_dir", str(output)],
        capsys,
    )
    assert_refused(status, line, "holds checkpoint-4/ without trainer_state.json", "give another --output_dir")
    assert _snapshot(output) == before


# ---------------------------------------------------------------------------------------------
# Flags, paths and data refused before the model loads


def test_seeds_the_trainer_cannot_use_are_refused(tmp_path, capsys):
    for seed in ("-1", str(2**32)):
        status, line = cli(
            run_ner,
            ["--model_name_or_path", str(tmp_path / "never_read"), "--do_eval", "--seed", seed]
            + ["--output_dir", str(tmp_path / "out")],
            capsys,
        )
        assert_refused(status, line, f"--seed must be between 0 and {2**32 - 1}, got {seed}")
    assert not (tmp_path / "out").exists()


def test_paths_through_symlink_loops_are_refused_naming_the_loop(tmp_path, tokenizer_dir, dump_dir, capsys):
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop_back", loop)
    os.symlink(loop, tmp_path / "loop_back")
    validation = write_csv(tmp_path / "v.csv", sentiment_rows(4))
    base = ["--model_name_or_path", str(dump_dir), "--task_name", "sst2", "--do_eval"] + common_args(
        tmp_path, tokenizer_dir
    )
    status, line = cli(
        run_glue, base + ["--validation_file", str(validation), "--output_dir", str(loop / "out")], capsys
    )
    assert_refused(status, line, f"--output_dir {loop / 'out'}", f"{loop} is a loop of symbolic links")
    status, line = cli(run_glue, base + ["--validation_file", str(loop / "v.csv")], capsys)
    assert_refused(status, line, f"--validation_file {loop / 'v.csv'}", "loop of symbolic links")
    assert not (tmp_path / "out").exists()


def test_a_question_leaving_no_room_for_its_context_is_named(tmp_path, tokenizer_dir, dump_dir, capsys):
    rows = qa_rows(4)
    rows[2]["question"] = " ".join(["where"] * 40) + " ?"
    validation = write_jsonl(tmp_path / "dev.jsonl", rows)
    status, line = cli(
        run_qa,
        ["--model_name_or_path", str(dump_dir), "--validation_file", str(validation), "--do_eval"]
        + QA_SHAPE
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(status, line, "question 'q2'", str(validation), "41 tokens long", "no room is left for its context")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Disk full while saving: one line, and no file left looking complete


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_disk_full_while_saving_leaves_earlier_files_intact(tmp_path, tokenizer_dir, dump_dir, capsys, monkeypatch):
    from transformers import Trainer

    import eval_common

    data = write_csv(tmp_path / "d.csv", sentiment_rows(8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text('{"eval_accuracy": 0.5}')
    args = [
        "--model_name_or_path",
        str(dump_dir),
        "--task_name",
        "sst2",
        "--do_eval",
        "--validation_file",
        str(data),
    ] + common_args(tmp_path, tokenizer_dir)

    def write_half_then_fail(self, output_dir=None, _internal_call=False):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a model")
        _disk_full()

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_model", write_half_then_fail)
        status, line = cli(run_glue, args + ["--do_train", "--train_file", str(data)], capsys)
    assert_refused(status, line, f"cannot save the fine-tuned model in --output_dir {out}", "No space left on device")
    assert sorted(p.name for p in out.iterdir() if p.name != "runs") == ["eval_results.json"]

    with monkeypatch.context() as patch:
        patch.setattr(eval_common.json, "dump", lambda obj, f, **kw: (f.write("{"), _disk_full()))
        status, line = cli(run_glue, args, capsys)
    assert_refused(status, line, f"cannot write the eval results in --output_dir {out}", "No space left on device")
    assert (out / "eval_results.json").read_text() == '{"eval_accuracy": 0.5}'
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Evaluation classes that training never shows


def test_a_validation_label_never_seen_in_training_is_refused_naming_it_and_both_files(
    tmp_path, tokenizer_dir, dump_dir, capsys
):
    train = write_csv(tmp_path / "train.csv", nli_rows(6, labels=("entailment", "contradiction")))
    validation = write_csv(tmp_path / "dev.csv", nli_rows(6))  # also "neutral"
    status, line = cli(
        run_glue,
        ["--model_name_or_path", str(dump_dir), "--train_file", str(train), "--validation_file", str(validation)]
        + ["--do_train", "--do_eval"]
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(status, line, "label 'neutral' in", "dev.csv", "never occurs in the training data", "train.csv")
    assert not (tmp_path / "out").exists()


def test_a_validation_tag_never_seen_in_training_is_refused_naming_it_and_both_files(
    tmp_path, tokenizer_dir, dump_dir, capsys
):
    rows = ner_rows(6)
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in rows if "B-ORG" not in r["ner_tags"]])
    validation = write_jsonl(tmp_path / "dev.jsonl", rows)
    status, line = cli(
        run_ner,
        ["--model_name_or_path", str(dump_dir), "--train_file", str(train), "--validation_file", str(validation)]
        + ["--do_train", "--do_eval"]
        + common_args(tmp_path, tokenizer_dir),
        capsys,
    )
    assert_refused(status, line, "tag 'B-ORG' in", "dev.jsonl", "never occurs in the training data", "train.jsonl")
    assert not (tmp_path / "out").exists()


def test_a_declared_tag_never_seen_in_training_is_kept_with_a_warning(tmp_path, tokenizer_dir, dump_dir, caplog):
    rows = ner_rows(6)
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in rows if "B-ORG" not in r["ner_tags"]])
    validation = write_jsonl(tmp_path / "dev.jsonl", rows)
    metrics = run_ner.main(
        ["--model_name_or_path", str(dump_dir), "--train_file", str(train), "--validation_file", str(validation)]
        + ["--do_train", "--do_eval", "--label_names", "O,B-PER,B-LOC,B-ORG"]
        + common_args(tmp_path, tokenizer_dir)
    )
    assert any(key.startswith("eval_") for key in metrics), metrics
    warned = [r.getMessage() for r in caplog.records if "never occurs in the training data" in r.getMessage()]
    assert len(warned) == 1 and "'B-ORG'" in warned[0] and "dev.jsonl" in warned[0], warned
    assert "count as errors" in warned[0]


def test_an_mlm_tokenizer_without_padding_token_is_refused(tmp_path, dump_dir, capsys):
    from conftest import VOCAB
    from transformers import BertTokenizer

    folder = tmp_path / "no_pad"
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, pad_token=None).save_pretrained(folder)
    validation = write_jsonl(tmp_path / "v.jsonl", [{"text": row["sentence"]} for row in sentiment_rows(8)])
    for layout in ([], ["--line_by_line"]):
        status, line = cli(
            run_mlm,
            ["--model_name_or_path", str(dump_dir), "--do_eval", "--validation_file", str(validation), *layout]
            + ["--max_seq_length", "16"]
            + common_args(tmp_path, folder),
            capsys,
        )
        assert_refused(status, line, f"tokenizer {folder} has no padding token")
        assert not (tmp_path / "out").exists()
