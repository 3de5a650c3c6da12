"""The README's extraction and training commands, end to end on the real data; training-loop invariants."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import tensorboard_scalars, train_argv
from transformers import AutoModelForMaskedLM

import causal_train
import run_folders
from scripts import extract_distilbert
from utils import UserError


@pytest.fixture
def extracted(tmp_path, tiny_bert_teacher) -> Path:
    out = tmp_path / "distillation_checkpoints" / "tiny_num_layer_2.pth"
    extract_distilbert.main(
        [
            "--model_type",
            "bert",
            "--model_name",
            str(tiny_bert_teacher),
            "--dump_checkpoint",
            str(out),
            "--num_layers",
            "2",
            "--vocab_transform",
        ]
    )
    return out


def test_extraction_copies_the_chosen_teacher_layers(extracted, tiny_bert_teacher):
    state = torch.load(extracted, weights_only=True)
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_bert_teacher).state_dict()
    # A 4-layer teacher spreads a 2-layer student over its first and last blocks.
    assert torch.equal(
        state["distilbert.transformer.layer.1.attention.q_lin.weight"],
        teacher["bert.encoder.layer.3.attention.self.query.weight"],
    )
    assert torch.equal(
        state["distilbert.transformer.layer.0.ffn.lin1.bias"], teacher["bert.encoder.layer.0.intermediate.dense.bias"]
    )
    assert torch.equal(state["vocab_transform.weight"], teacher["cls.predictions.transform.dense.weight"])


def test_readme_commands_train_a_student_that_loads_with_from_pretrained(
    shared_data, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, extracted
):
    dump = causal_train.main(
        train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, weights=extracted)
    )
    assert dump == tmp_path / "results" / "run"
    for name in (
        "parameters.json",
        "git_log.json",
        "config.json",
        "pytorch_model.bin",
        "checkpoint.pth",
        "model.safetensors",
    ):
        assert (dump / name).is_file(), name
    params = json.loads((dump / "parameters.json").read_text())
    assert params["alpha_causal_ce"] == 0.25 and params["interchange_consecutive_only"] is True
    assert set(json.loads((dump / "git_log.json").read_text())) >= {"repo_id", "repo_sha", "repo_branch"}
    student = AutoModelForMaskedLM.from_pretrained(dump)
    saved = torch.load(dump / "pytorch_model.bin", weights_only=True)
    for k, v in student.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # Frozen position embeddings did not move from the extracted weights.
    init = torch.load(extracted, weights_only=True)
    assert torch.equal(
        saved["distilbert.embeddings.position_embeddings.weight"],
        init["distilbert.embeddings.position_embeddings.weight"],
    )
    assert not torch.equal(
        saved["distilbert.transformer.layer.0.ffn.lin1.weight"], init["distilbert.transformer.layer.0.ffn.lin1.weight"]
    )
    tags = _tensorboard_tags(dump)
    for tag in (
        "losses/loss",
        "losses/loss_ce",
        "losses/loss_mlm",
        "losses/loss_cos",
        "losses/loss_causal_ce",
        "metrics/interchange_accuracy",
        "learning_rate/lr",
        "global/memory_usage",
        "global/speed",
        "losses/cum_avg_loss_epoch",
        "parameter_mean/distilbert.embeddings.word_embeddings.weight",
    ):
        assert tag in tags, tag


def _scalars(dump: Path, tag: str) -> list[float]:
    return list(tensorboard_scalars(dump, tag).values())


def _tensorboard_tags(dump: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(dump / "log" / "train"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--parallel_crossway"], "parallel_crossway"),
        (["--alpha_clm", "0.5"], "alpha_clm"),
        (["--alpha_ce", "-1"], "alpha_ce"),
        (["--teacher_type", "gpt2"], "bert/roberta teacher"),
        (["--token_counts", "/nonexistent/counts.pickle"], "token counts file not found"),
        (["--neuron_mapping", "/nonexistent/map.nm"], "neuron mapping not found"),
        (["--interchange_masked_token_only"], "choose one of"),
        (["--resume"], "choose one of --resume .* and --force"),
        (["--max_steps", "0"], "--max_steps must be > 0, or -1"),
        (["--max_steps", "-2"], "--max_steps must be > 0, or -1"),
    ],
)
def test_inconsistent_flags_are_refused_before_training(
    tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, flags, message
):
    with pytest.raises(UserError, match=message):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, *flags))
    assert not (tmp_path / "results").exists()


def test_force_refuses_to_delete_a_folder_that_is_not_a_dump(
    shared_data, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    precious = tmp_path / "results" / "run"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("months of work")
    with pytest.raises(UserError, match="not a run's dump"):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping))
    assert (precious / "thesis.tex").read_text() == "months of work"


def test_student_teacher_vocab_mismatch_is_refused(shared_data, tmp_path, tiny_bert_teacher, tiny_mapping):
    config = tmp_path / "small_vocab.json"
    config.write_text(json.dumps(dict(dim=32, n_heads=4, hidden_dim=64, n_layers=2, vocab_size=1000)))
    with pytest.raises(UserError, match="vocab size 1000"):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, config, tiny_mapping))


def test_every_training_flag_is_documented_in_the_training_docs():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    flags = {s for action in causal_train.build_parser()._actions for s in action.option_strings if s.startswith("--")}
    missing = sorted(f for f in flags - {"--help"} if f"`{f}`" not in readme and f"{f} " not in readme)
    assert not missing, f"flags missing from docs/training.md: {missing}"


def test_force_keeps_a_user_folder_whose_parameters_json_is_any_json(
    tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    precious = tmp_path / "results" / "run"
    precious.mkdir(parents=True)
    (precious / "parameters.json").write_text("{}")
    (precious / "thesis.tex").write_text("months of work")
    with pytest.raises(UserError, match="not a run's dump"):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping))
    assert (precious / "thesis.tex").read_text() == "months of work"
    assert (precious / "parameters.json").read_text() == "{}"


def test_force_recognises_a_run_by_its_marker_or_an_older_run_by_its_parameters_and_files(tmp_path):
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / run_folders.RUN_MARKER).write_text(run_folders.RUN_MARKER_TEXT)
    assert run_folders.is_previous_run(marked)
    (marked / run_folders.RUN_MARKER).write_text("{}")
    assert not run_folders.is_previous_run(marked)

    older = tmp_path / "older"  # written before the marker existed
    (older / "checkpoints").mkdir(parents=True)
    params = {k: "x" for k in run_folders.RUN_PARAMETER_KEYS}
    (older / "parameters.json").write_text(json.dumps(params))
    (older / "model_epoch_0.pth").write_bytes(b"")
    assert run_folders.is_previous_run(older)
    (older / "notes.txt").write_text("mine")
    assert not run_folders.is_previous_run(older)


def test_force_replaces_a_previous_run(small_run_argv, tmp_path):
    dump = causal_train.main(small_run_argv("--max_steps", "2"))
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["state_0000000004_rank0.pth"]
    causal_train.main(small_run_argv("--max_steps", "1"))
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["state_0000000002_rank0.pth"]


def test_every_output_follows_the_umask(small_run_argv):
    previous = os.umask(0o027)
    try:
        dump = causal_train.main(small_run_argv("--max_steps", "1"))
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(dump)): stat.S_IMODE(p.stat().st_mode) for p in dump.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "checkpoints/state_0000000002_rank0.pth" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}


def test_an_unwritable_dump_path_is_refused_before_any_model_or_data_loads(monkeypatch, small_run_argv, tmp_path):
    monkeypatch.setattr(causal_train, "load_teacher", lambda args: pytest.fail("the teacher was loaded"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"--dump_path: .*a_file is not a folder"):
        causal_train.main(small_run_argv("--dump_path", str(tmp_path / "a_file" / "results")))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match=r"--dump_path: cannot write in .*locked"):
            causal_train.main(small_run_argv("--dump_path", str(locked / "results")))
        assert list(locked.iterdir()) == []


def test_data_augment_trains_from_the_command_line(small_run_argv):
    dump = causal_train.main(small_run_argv("--data_augment", "--max_steps", "2"))
    for tag in ("losses/loss_causal_ce", "metrics/interchange_accuracy"):
        values = _scalars(dump, tag)
        assert len(values) == 4 and all(math.isfinite(v) for v in values), tag
    assert (dump / "model.safetensors").is_file()


def test_help_shows_every_flag_with_its_default_and_an_example(capsys):
    parser = causal_train.build_parser()
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert not undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--alpha_ce ALPHA_CE Weight of the distillation (KL) loss. (default: 0.5)" in " ".join(text.split())
    assert text.count("(default:") >= len([a for a in parser._actions if a.dest != "help"])
    assert "example" in text and "python causal_train.py --force" in text


def test_help_lists_every_dataclass_field_once_with_its_help_and_parses_to_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        causal_train.main(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    actions = causal_train.build_parser()._actions
    flags = [s for action in actions for s in action.option_strings]
    config, options = causal_train.parse_args(
        ["--dump_path", "d", "--data_file", "f", "--student_type", "gpt2", "--student_config", "c"]
        + ["--teacher_type", "gpt2", "--teacher_name", "t"]
    )
    for parsed in (options, config):
        for f in dataclasses.fields(parsed):
            name, meta = f"--{f.name}", f.metadata
            assert flags.count(name) == 1, name
            value = f.name.upper() if "choices" not in meta else "{" + ",".join(meta["choices"]) + "}"
            value = "" if f.type == "bool" else value  # a store_true flag takes no value
            aliases = "".join(f", {s}{value}" for s in meta.get("aliases", ()))
            default = None if f.default is dataclasses.MISSING else f.default
            line = "".join(f"{name}{value}{aliases}{meta['help']}(default:{default})".split())
            assert text.count(line) == 1, f"{name} and its help are not listed once in --help"
            if f.default is not dataclasses.MISSING:
                assert getattr(parsed, f.name) == f.default, name
            if "negation_help" in meta:
                assert text.count("".join(f"--no_{f.name}{meta['negation_help']}(default:True)".split())) == 1
    fields = {f.name for parsed in (options, config) for f in dataclasses.fields(parsed)}
    assert {action.dest for action in actions} - {"help"} == fields  # no flag outside the two dataclasses


def test_git_log_records_the_commit_of_the_code_that_runs():
    import subprocess

    repo = Path(run_folders.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert run_folders.git_log()["repo_sha"] == head.stdout.strip()
