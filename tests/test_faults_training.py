"""Fault injection for training (causal_train.py) and extraction: malformed student configs and weights,
malformed data, teacher folders missing a part, impossible flags, full outputs. Each gives one `error:`
line naming the problem and the file or flag, exit status 2 through the CLI, is found before the long
work (data loading, the run folder) where it can be, and leaves no half-made run folder and every
previous file intact.

The resume faults (truncated, tampered and foreign states, another corpus, new settings) are in
tests/test_resume.py; unwritable --dump_path and --force on a user folder in tests/test_training.py.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY,
    Payload,
    assert_one_error_line,
    resume_argv,
    run_train,
    save_tokenizer_files,
    snapshot,
    train_argv,
)

import causal_train
import model_files
import model_loading
from scripts import extract, extract_distilbert
from utils import UserError


def distilbert_config(**changes) -> dict:
    base = dict(
        dim=TINY["hidden"],
        n_heads=TINY["heads"],
        hidden_dim=TINY["intermediate"],
        n_layers=2,
        vocab_size=30522,
        max_position_embeddings=512,
    )
    return {**base, **changes}


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the corpus is loaded: the refusal must come before it."""
    monkeypatch.setattr(causal_train, "load_sequences", lambda *a: pytest.fail("the corpus was loaded"))


# --- malformed student configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ("{dim: 32", "is not JSON"),
        ("[1, 2]", "must be a JSON object of settings, not a list"),
        (distilbert_config(dim=30), "'dim' 30 is not divisible by 'n_heads' 4"),
        (distilbert_config(n_layers=0), "'n_layers' must be a positive integer, got 0"),
        (distilbert_config(hidden_dim=-64), "'hidden_dim' must be a positive integer, got -64"),
        (distilbert_config(dim="32"), "'dim' must be int, got '32'"),
        (distilbert_config(n_heads=4.0), "'n_heads' must be int, got 4.0"),
        (distilbert_config(sinusoidal_pos_embds="false"), "'sinusoidal_pos_embds' must be bool"),
        (distilbert_config(dropout=1.5), "'dropout' must be in [0, 1]"),
        (
            distilbert_config(intermediate_size=64),
            "'intermediate_size' is not a distilbert setting (it would be ignored)",
        ),
        (distilbert_config(model_type="gpt2"), "has model_type 'gpt2', but --student_type is distilbert"),
    ],
)
def test_a_malformed_student_config_is_refused_before_any_model_loads(
    monkeypatch, small_run_argv, tmp_path, content, message
):
    monkeypatch.setattr(causal_train, "load_teacher", lambda args: pytest.fail("the teacher was loaded"))
    config = tmp_path / "student.json"
    config.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match="student config") as e:
        causal_train.main(small_run_argv("--student_config", str(config)))
    assert message in str(e.value) and str(config) in str(e.value)
    assert not (tmp_path / "results").exists()


def test_a_config_of_another_family_fails_through_the_cli_without_a_run_folder(small_run_argv, tmp_path):
    config = tmp_path / "gpt2.json"
    config.write_text(json.dumps(dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=2, vocab_size=30522)))
    result = run_train(small_run_argv("--student_config", str(config)), tmp_path)
    assert_one_error_line(result, str(config), "model_type 'gpt2'", "--student_type is distilbert")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_key_value_heads=3), "'num_attention_heads' 4 is not divisible by 'num_key_value_heads' 3"),
        (dict(hidden_size=34), "The hidden size (34) is not a multiple of the number of attention heads (4)"),
        (dict(hidden_size=28, head_dim=7), "RoPE requires an even rotary dimension, but got `head_dim`=7"),
    ],
)
def test_inconsistent_decoder_student_configs_name_the_keys(tmp_path, changes, message):
    config = tmp_path / "llama.json"
    config.write_text(
        json.dumps(
            {
                **dict(
                    model_type="llama",
                    hidden_size=32,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    num_hidden_layers=2,
                    intermediate_size=64,
                    vocab_size=200,
                ),
                **changes,
            }
        )
    )
    with pytest.raises(UserError, match="student config") as e:
        model_loading.check_student_config(str(config), "llama")
    assert message in str(e.value)


def test_every_shipped_student_config_passes_the_checks():
    for path in sorted((REPO / "training_configs").glob("*.json")):
        stem = path.stem
        family = json.loads(path.read_text()).get("model_type") or (
            "gpt2" if "gpt2" in stem else "roberta" if "roberta" in stem else "distilbert"
        )
        assert model_loading.check_student_config(str(path), family).model_type == family


# --- malformed student weights ------------------------------------------------------------------------


def student_state(**changes) -> dict:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    return DistilBertForMaskedLM(DistilBertConfig(**distilbert_config(**changes))).state_dict()


def write_weights(kind: str, path: Path) -> None:
    if kind == "wrong shape":
        torch.save(student_state(hidden_dim=48), path)
    elif kind == "tampered":
        torch.save({"distilbert.embeddings.word_embeddings.weight": Payload(path.with_name("ran"))}, path)
    elif kind == "truncated":
        torch.save(student_state(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a list of tensors, not a state dict
        torch.save([torch.zeros(2)], path)


@pytest.mark.parametrize(
    "kind, message",
    [
        (
            "wrong shape",
            "distilbert.transformer.layer.0.ffn.lin1.weight has shape (48, 32), the student's "
            "(--student_config) (64, 32)",
        ),
        ("tampered", "refused student weights"),
        ("truncated", "(truncated or not a torch file)"),
        ("not a state dict", "is not a state dict"),
    ],
)
def test_bad_student_weights_are_refused_before_the_corpus_loads(no_long_work, small_run_argv, tmp_path, kind, message):
    weights = tmp_path / "student.pth"
    write_weights(kind, weights)
    with pytest.raises(UserError) as e:
        causal_train.main(small_run_argv("--student_pretrained_weights", str(weights)))
    assert message in str(e.value) and str(weights) in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()  # the payload never ran
    assert not (tmp_path / "results").exists()


# --- teacher folders missing a part ---------------------------------------------------------------------


def teacher_without(part: str, tiny_bert_teacher: Path, folder: Path) -> Path:
    """A copy of the tiny teacher without its config.json / tokenizer files / LM head."""
    import shutil

    from transformers import BertModel

    if part == "lm head":  # a bare encoder saved with its tokenizer
        BertModel.from_pretrained(tiny_bert_teacher).save_pretrained(folder)
        save_tokenizer_files(tiny_bert_teacher, folder)
        return folder
    shutil.copytree(tiny_bert_teacher, folder)
    for name in (
        ["config.json"] if part == "config" else list(model_files.TOKENIZER_FILES) + ["special_tokens_map.json"]
    ):
        (folder / name).unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize(
    "part, message",
    [
        ("config", "has no config.json"),
        ("tokenizer", "no tokenizer files in"),
        ("lm head", "has no trained LM head (missing cls.predictions.bias"),
    ],
)
def test_a_teacher_folder_missing_a_part_is_named(
    no_long_work, small_run_argv, tiny_bert_teacher, tmp_path, part, message
):
    teacher = teacher_without(part, tiny_bert_teacher, tmp_path / "teacher")
    with pytest.raises(UserError) as e:
        causal_train.main(small_run_argv("--teacher_name", str(teacher)))
    assert message in str(e.value) and str(teacher) in str(e.value)
    assert not (tmp_path / "results").exists()


def test_a_teacher_without_its_lm_head_is_refused_through_the_cli(small_run_argv, tiny_bert_teacher, tmp_path):
    teacher = teacher_without("lm head", tiny_bert_teacher, tmp_path / "encoder")
    result = run_train(small_run_argv("--teacher_name", str(teacher)), tmp_path)
    assert_one_error_line(
        result,
        f"teacher {teacher} has no trained LM head",
        "a bare encoder is not a teacher",
        "scripts/fit_mlm_head.py",
    )
    assert not (tmp_path / "results").exists()


def test_a_missing_teacher_folder_is_a_folder_not_a_hub_id(small_run_argv, tmp_path):
    for name in (str(tmp_path / "nowhere"), "./nowhere", "models/org/nowhere"):
        with pytest.raises(UserError, match=f"--teacher_name: the folder {name} does not exist"):
            causal_train.main(small_run_argv("--teacher_name", name))
    for hub_id in ("bert-base-uncased", "org/name"):  # still Hub ids: left to from_pretrained
        model_loading.check_teacher_folder(hub_id)
    assert not (tmp_path / "results").exists()


def test_extraction_names_a_missing_folder_config_and_head(tiny_bert_teacher, tmp_path):
    out = str(tmp_path / "student.pth")
    no_config = teacher_without("config", tiny_bert_teacher, tmp_path / "no_config")
    encoder = teacher_without("lm head", tiny_bert_teacher, tmp_path / "encoder")
    cases = [
        (str(tmp_path / "nowhere"), "--model_name: the folder .*nowhere does not exist"),
        (str(no_config), "--model_name: .*no_config has no config.json"),
        (str(encoder), "encoder has no trained LM head"),
    ]
    for name, message in cases:
        with pytest.raises(UserError, match=message):
            extract_distilbert.main(["--model_name", name, "--dump_checkpoint", out, "--num_layers", "2"])
    assert not Path(out).exists()


# --- malformed data -------------------------------------------------------------------------------------


def bad_data(kind: str, folder: Path) -> tuple[str, Path]:
    """(flag, file) of a corrupt corpus, a corpus with ids beyond the vocabulary, or counts of the wrong length."""
    if kind == "corrupt corpus":
        path = folder / "corrupt.pickle"
        path.write_bytes(pickle.dumps([np.array([101, 7, 102], dtype=np.uint16)] * 20)[:-30])
        return "--data_file", path
    if kind == "ids beyond the vocabulary":
        path = folder / "wide.pickle"
        path.write_bytes(pickle.dumps([np.array([101, 40000, 7, 102], dtype=np.uint16)] * 20))
        return "--data_file", path
    path = folder / "counts.pickle"
    path.write_bytes(pickle.dumps(list(range(1000))))
    return "--token_counts", path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("corrupt corpus", "corrupt.pickle"),
        ("ids beyond the vocabulary", "40000"),
        ("token counts of the wrong length", "has 1000 entries, the vocabulary 30522"),
    ],
)
def test_malformed_data_is_refused_without_a_run_folder(small_run_argv, tmp_path, kind, message):
    flag, path = bad_data(kind, tmp_path)
    with pytest.raises(UserError) as e:
        causal_train.main(small_run_argv(flag, str(path)))
    assert message in str(e.value) and path.name in str(e.value)
    assert not (tmp_path / "results").exists()


def test_token_counts_are_checked_before_the_corpus_loads(no_long_work, small_run_argv, tmp_path):
    _, counts = bad_data("token counts", tmp_path)
    with pytest.raises(UserError, match="has 1000 entries"):
        causal_train.main(small_run_argv("--token_counts", str(counts)))


# --- impossible flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--temperature", "-2"], "--temperature must be > 0, got -2.0"),
        (["--learning_rate=-1e-4"], "--learning_rate must be >= 0"),
        (["--warmup_prop", "1.5"], "--warmup_prop must be in [0, 1], got 1.5"),
        (["--mlm_mask_prop", "0"], "--mlm_mask_prop must be in (0, 1], got 0.0"),
        (["--mlm_mask_prop", "1.2"], "--mlm_mask_prop must be in (0, 1]"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
        (["--interchange_max_token", "0"], "--interchange_max_token must be >= 1, or -1 for no cap; got 0"),
        (["--interchange_max_token", "-3"], "--interchange_max_token must be >= 1, or -1"),
        (
            ["--word_mask", "-0.1", "--word_keep", "0.6", "--word_rand", "0.5"],
            "--word_mask must be in [0, 1], got -0.1",
        ),
        (["--weight_decay", "-0.01"], "--weight_decay must be >= 0"),
        (["--adam_epsilon=-1e-6"], "--adam_epsilon must be >= 0"),
        (["--alpha_ce", "nan"], "--alpha_ce must be a finite number, got nan"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    ],
)
def test_impossible_numeric_flags_are_refused_before_any_work(monkeypatch, small_run_argv, tmp_path, flags, message):
    monkeypatch.setattr(causal_train, "load_teacher", lambda args: pytest.fail("the teacher was loaded"))
    with pytest.raises(UserError) as e:
        causal_train.main(small_run_argv(*flags))
    assert message in str(e.value) and "learning rate" not in str(e.value).replace("--learning_rate", "")
    assert not (tmp_path / "results").exists()


# --- full outputs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_teacher, tiny_student_config, tiny_mapping, small_corpus):
    """A 1-step run (state at micro-batch 2, final model files) and its argv; the tests below leave it as it was."""
    argv = train_argv(
        tmp_path_factory.mktemp("finished"),
        tiny_bert_teacher,
        tiny_student_config,
        tiny_mapping,
        "--max_steps",
        "1",
        data_file=small_corpus,
    )
    return argv, causal_train.main(argv)


LIMIT = 1 << 20  # 1 MiB: the tiny student's files (4 MB and more) do not fit; logs and JSON do


def test_a_full_disk_while_saving_a_state_keeps_the_previous_state_and_model(finished_run, tmp_path):
    argv, run = finished_run
    before = snapshot(run / "checkpoints") | {"model.safetensors": (run / "model.safetensors").read_bytes()}
    result = run_train(resume_argv(argv, "--max_steps", "2"), tmp_path, file_size_limit=LIMIT)
    state = run / "checkpoints" / "state_0000000004_rank0.pth"
    assert_one_error_line(
        result, f"cannot write {state}: File too large", "the previous state_0000000004_rank0.pth (if any) is kept"
    )
    assert snapshot(run / "checkpoints") == {k: v for k, v in before.items() if k != "model.safetensors"}
    assert (run / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert not [p for p in run.rglob(".*.tmp")]  # no partial file left


def test_a_full_disk_at_the_final_save_keeps_the_previous_model(finished_run, tmp_path):
    argv, run = finished_run
    before = (run / "model.safetensors").read_bytes()
    # No state falls due before the end: the first large write is the final model.safetensors.
    result = run_train(
        resume_argv(argv, "--max_steps", "2", "--checkpoint_interval", "1000"), tmp_path, file_size_limit=LIMIT
    )
    assert_one_error_line(
        result, f"cannot write the student into {run}", "File too large", "what was there before is kept"
    )
    assert (run / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["state_0000000002_rank0.pth"]


def test_a_full_disk_during_extraction_keeps_the_previous_checkpoint(monkeypatch, tiny_bert_teacher, tmp_path):
    import errno

    import checkpointing

    def write_half_then_fail(self, data):  # the disk fills up in the middle of the file
        self.f.write(bytes(data)[: len(data) // 2])
        self.error = OSError(errno.ENOSPC, "No space left on device")
        raise self.error

    out = tmp_path / "student.pth"
    out.write_bytes(b"previous checkpoint")
    monkeypatch.setattr(checkpointing._RecordingWriter, "write", write_half_then_fail)
    with pytest.raises(UserError, match=f"cannot write {out}: No space left on device"):
        extract_distilbert.main(
            ["--model_name", str(tiny_bert_teacher), "--dump_checkpoint", str(out), "--num_layers", "2"]
        )
    assert out.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pth"]


def test_a_failed_student_folder_write_during_extraction_leaves_nothing(monkeypatch, tmp_path):
    import errno

    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

    teacher = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(teacher)

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    with pytest.raises(UserError, match="--dump_folder .*student: cannot write the student: .*No space left"):
        extract.main(
            [
                "--model_type",
                "gpt2",
                "--model_name",
                str(teacher),
                "--num_layers",
                "1",
                "--dump_checkpoint",
                str(tmp_path / "s.pth"),
                "--dump_folder",
                str(tmp_path / "student"),
            ]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "s.pth"]  # no (half-made) student folder


HOLD_LOCK = (
    "import sys, time, pathlib; from run_folders import lock_run_dir; "
    "lock_run_dir(pathlib.Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
)


@pytest.mark.parametrize("mode", ["--force", "--resume"])
def test_a_run_folder_in_use_is_refused_and_untouched(tmp_path, small_run_argv, mode):
    """A second run on a folder another live process holds exits 2 naming the folder and the holder's pid."""
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / ".causal_train_run").write_text("A run folder of causal_train.py (DIITO). --force may replace it.\n")
    (run_dir / "mine.txt").write_text("live")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        argv = [flag for flag in small_run_argv() if flag != "--force"]  # train_argv passes --force
        result = run_train([*argv, mode], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(run_dir) in line and f"pid {holder.pid}" in line
    assert (run_dir / "mine.txt").read_text() == "live"


def test_a_stale_lock_does_not_block(tmp_path):
    """The lock of a process that died is free: flock ends with its holder."""
    from run_folders import lock_run_dir

    script = HOLD_LOCK.replace("time.sleep(60)", "pass")
    holder = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO)
    assert holder.returncode == 0
    assert (tmp_path / ".causal_train.lock").read_text().split()[0].isdigit()
    lock_run_dir(tmp_path)


def test_error_messages_take_the_first_line_or_the_type_of_a_silent_exception():
    from utils import first_line

    assert first_line(ValueError("bad header\nmore detail")) == "bad header"
    assert first_line(RuntimeError()) == "RuntimeError"  # no IndexError on an empty message
    assert first_line(OSError("  \n")) == "OSError"
