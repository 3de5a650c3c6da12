"""Fault injection, hardening round 2 (issue #21): broken model folders for training, extraction and
the quickstart; resume rules; the summary written after the model; flags that would do nothing;
full disks, loops of symbolic links and the --force race on run folders; the quickstart's marker.

Each fault ends in one `UserError` naming the file or flag (one `error:` line and exit status 2
through the CLI), before anything is written, and leaves every earlier file as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    Payload,
    assert_one_error_line,
    resume_argv,
    run_train,
    save_tiny_decoder_teacher,
    save_word_level_tokenizer,
    snapshot,
    train_argv,
)

import causal_train
import model_files
import run_folders
import student_files
from quickstart_lib import pipeline
from quickstart_lib.recipes.base import check_teacher_dir
from quickstart_lib.settings import Settings
from scripts import extract, extract_distilbert
from utils import UserError


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the corpus is loaded: the refusal must come before it."""
    monkeypatch.setattr(causal_train, "load_sequences", lambda *a: pytest.fail("the corpus was loaded"))


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def cut_in_half(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def as_pytorch_bin(folder: Path) -> Path:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder / "pytorch_model.bin"


def tampered_bin(folder: Path) -> Path:
    """A pytorch_model.bin whose unpickling would create folder/../payload_ran."""
    from safetensors.torch import load_file

    state = dict(load_file(folder / "model.safetensors"))
    state["bert.embeddings.word_embeddings.weight"] = Payload(folder.parent / "payload_ran")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder / "pytorch_model.bin"


def other_tokenizer(folder: Path, vocab: int) -> Path:
    """Replace the folder's tokenizer with a word-level one of `vocab` words (pads with id 3)."""
    for name in model_files.TOKENIZER_FILES + ("special_tokens_map.json",):
        (folder / name).unlink(missing_ok=True)
    save_word_level_tokenizer(folder, vocab)
    return folder / "tokenizer.json"


# fault -> (break the folder, returning the file the error must name; fragment of the error)
TEACHER_FAULTS = {
    "safetensors cut in half": (lambda f: cut_in_half(f / "model.safetensors"), "is truncated or corrupt"),
    "pytorch_model.bin cut in half": (lambda f: cut_in_half(as_pytorch_bin(f)), "is truncated or corrupt"),
    "pytorch_model.bin holding code": (tampered_bin, "holds more than tensors (read as data only)"),
    "a size as text": (
        lambda f: (edit_config(f, num_hidden_layers="4"), f / "config.json")[1],
        "'num_hidden_layers'",
    ),
    "a flag as text": (lambda f: (edit_config(f, is_decoder="no"), f / "config.json")[1], "is_decoder"),
    "config.json not JSON": (
        lambda f: ((f / "config.json").write_text('{"model_type": "bert", '), f / "config.json")[1],
        "not valid JSON",
    ),
    "tokenizer.json not JSON": (
        lambda f: ((f / "tokenizer.json").write_text('{"version": '), f / "tokenizer.json")[1],
        "not valid JSON",
    ),
    "another model's tokenizer": (lambda f: other_tokenizer(f, 200), "is another model's: it pads with id 3"),
    "a tokenizer with more ids": (
        lambda f: other_tokenizer(f, 31000),
        "has 31000 tokens but the model's vocab_size is 30522",
    ),
}


@pytest.mark.parametrize("fault", list(TEACHER_FAULTS))
def test_a_broken_teacher_folder_is_refused_naming_the_file(
    fault, no_long_work, small_run_argv, tiny_bert_teacher, tmp_path
):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_teacher, teacher)
    break_it, fragment = TEACHER_FAULTS[fault]
    broken = break_it(teacher)
    with pytest.raises(UserError) as e:
        causal_train.main(small_run_argv("--teacher_name", str(teacher)))
    message = str(e.value)
    assert fragment in message and "\n" not in message, message
    assert str(broken) in message or fault in ("another model's tokenizer", "a tokenizer with more ids"), message
    assert str(teacher) in message and message.startswith("--teacher_name: "), message
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "payload_ran").exists()  # nothing in the pickle ran


def test_a_sound_teacher_folder_passes_even_without_model_type(tiny_bert_teacher, tmp_path):
    import model_loading

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_teacher, teacher)
    config = json.loads((teacher / "config.json").read_text())
    del config["model_type"]  # as some older saves wrote it: the family's config class reads it
    (teacher / "config.json").write_text(json.dumps(config))
    assert model_loading.check_teacher_folder(str(teacher), "bert") == teacher


def test_a_truncated_teacher_fails_through_the_cli_in_one_line(small_run_argv, tiny_bert_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_teacher, teacher)
    cut_in_half(teacher / "model.safetensors")
    result = run_train(small_run_argv("--teacher_name", str(teacher)), tmp_path)
    assert_one_error_line(result, str(teacher / "model.safetensors"), "truncated or corrupt")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("fault", ["safetensors cut in half", "a size as text", "pytorch_model.bin holding code"])
def test_extraction_refuses_a_broken_teacher_folder(fault, tiny_bert_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_teacher, teacher)
    break_it, fragment = TEACHER_FAULTS[fault]
    broken = break_it(teacher)
    out = tmp_path / "student.pth"
    with pytest.raises(UserError) as e:
        extract_distilbert.main(["--model_name", str(teacher), "--dump_checkpoint", str(out), "--num_layers", "2"])
    assert fragment in str(e.value) and str(broken) in str(e.value), str(e.value)
    assert not out.exists() and not (tmp_path / "payload_ran").exists()


@pytest.mark.parametrize("vocab, fragment", [(300, "has 300 tokens but the model's vocab_size is 200")])
def test_extraction_refuses_a_tokenizer_it_would_copy_into_the_student_folder(vocab, fragment, tmp_path):
    teacher = save_tiny_decoder_teacher("llama", tmp_path / "teacher", vocab=200, layers=2)
    other_tokenizer(teacher, vocab)
    args = ["--model_type", "llama", "--model_name", str(teacher), "--num_layers", "1"]
    args += ["--dump_checkpoint", str(tmp_path / "s.pth"), "--dump_folder", str(tmp_path / "student")]
    with pytest.raises(UserError, match=fragment):
        extract.main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


def test_the_quickstart_teacher_dir_is_checked_like_every_model_folder(tmp_path):
    teacher = save_tiny_decoder_teacher("llama", tmp_path / "teacher", vocab=200, layers=2)
    check_teacher_dir(teacher)  # a sound folder passes
    broken = tmp_path / "broken"
    for fault, fragment in [
        ("safetensors cut in half", "model.safetensors is truncated or corrupt"),
        ("a size as text", "config.json: .*'num_hidden_layers'"),
        ("tokens", "has 300 tokens but the model's vocab_size is 200"),
        ("no tokenizer", "no tokenizer files in"),
    ]:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(teacher, broken)
        if fault == "tokens":
            other_tokenizer(broken, 300)
        elif fault == "no tokenizer":
            for name in model_files.TOKENIZER_FILES + ("special_tokens_map.json",):
                (broken / name).unlink(missing_ok=True)
        else:
            TEACHER_FAULTS[fault][0](broken)
        with pytest.raises(UserError, match=fragment):
            check_teacher_dir(broken)
    import quickstart

    shutil.rmtree(broken)
    shutil.copytree(teacher, broken)
    other_tokenizer(broken, 300)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="has 300 tokens"):
        quickstart.main(["--tiny", "--teacher", "smollm2", "--teacher_dir", str(broken), "--output_dir", str(out)])
    assert not out.exists()


def loop(tmp_path: Path) -> Path:
    """tmp_path/loop: a symbolic link that points at itself."""
    link = tmp_path / "loop"
    link.symlink_to(link)
    return link


@pytest.mark.parametrize("flag", ["--teacher_name", "--student_config", "--data_file", "--dump_path"])
def test_paths_through_a_symlink_loop_are_refused_before_any_model_loads(flag, monkeypatch, small_run_argv, tmp_path):
    monkeypatch.setattr(causal_train, "load_teacher", lambda args: pytest.fail("the teacher was loaded"))
    path = loop(tmp_path) / "x"
    with pytest.raises(UserError, match="is a loop of symbolic links") as e:
        causal_train.main(small_run_argv(flag, str(path)))
    assert str(tmp_path / "loop") in str(e.value)
    with pytest.raises(UserError, match="is a loop of symbolic links"):
        extract_distilbert.main(["--model_name", str(path), "--dump_checkpoint", str(tmp_path / "s.pth")])


# --- resume rules, and the summary after the model -----------------------------------------------------


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, tiny_bert_teacher, tiny_student_config, tiny_mapping, small_corpus):
    """A finished 1-step run (its state at micro-batch 2) and its argv; tests work on copies."""
    root = tmp_path_factory.mktemp("one_step")
    argv = train_argv(
        root, tiny_bert_teacher, tiny_student_config, tiny_mapping, "--max_steps", "1", data_file=small_corpus
    )
    return argv, causal_train.main(argv)


@pytest.fixture
def copied_run(one_step_run, tmp_path):
    argv, run = one_step_run
    shutil.copytree(run, tmp_path / "run")
    return [str(tmp_path) if a == str(run.parent) else a for a in argv], tmp_path / "run"


def files_and_times(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {k: (v, (folder / k).stat().st_mtime_ns) for k, v in snapshot(folder).items()}


def test_resuming_a_finished_run_says_so_and_changes_nothing(copied_run, caplog):
    argv, run = copied_run
    before = files_and_times(run)
    with caplog.at_level(logging.WARNING):
        assert causal_train.main(resume_argv(argv)) == run
    assert any("already reached --max_steps 1" in r.getMessage() for r in caplog.records)
    assert files_and_times(run) == before


def test_resuming_with_another_student_architecture_is_refused_naming_the_flag(copied_run, tiny_student_config):
    argv, run = copied_run
    config = run.parent / "wider.json"
    config.write_text(json.dumps({**json.loads(tiny_student_config.read_text()), "n_layers": 3}))
    before = files_and_times(run)
    with pytest.raises(UserError, match=r"--resume: --student_config .*wider.json builds another student .*n_layers"):
        causal_train.main(resume_argv(argv, "--max_steps", "2", "--student_config", str(config)))
    assert files_and_times(run) == before


def test_the_summary_is_written_after_the_model(monkeypatch, copied_run):
    argv, run = copied_run
    seen = []
    save_final = student_files.save_final

    def watch(student, run_dir, *weights):
        seen.append((run_dir / "train_results.json").exists())
        save_final(student, run_dir, *weights)

    monkeypatch.setattr(student_files, "save_final", watch)
    causal_train.main(resume_argv(argv, "--max_steps", "2"))
    assert seen == [False]  # the old summary went first, the new one came after the model
    assert json.loads((run / "train_results.json").read_text())["optimizer_steps"] == 2


def test_a_failed_model_save_leaves_no_summary_claiming_it(monkeypatch, copied_run):
    argv, run = copied_run

    def half_then_full(student, run_dir, *weights):
        (run_dir / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(student_files, "save_final", half_then_full)
    with pytest.raises(UserError, match="cannot write the student into .*No space left on device"):
        causal_train.main(resume_argv(argv, "--max_steps", "2"))
    assert not (run / "train_results.json").exists()


# --- flags that would do nothing -------------------------------------------------------------------------


def clm_argv(argv: list[str]) -> list[str]:
    """`argv` as a causal-LM run of a GPT-2 pair (the checks below come before any file is read)."""
    out = [a for a in argv if a not in ("--mlm", "--freeze_pos_embs")]
    for flag, value in [("--alpha_mlm", "0"), ("--alpha_clm", "0.5"), ("--student_type", "gpt2")]:
        out[out.index(flag) + 1] = value
    out[out.index("--teacher_type") + 1] = "gpt2"
    return out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--interchange_prop", "0"], "--interchange_prop 0 interchanges no position"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
        (["--seed", str(2**32)], "--seed must be between 0 and 4294967295, got 4294967296"),
        (
            ["--no_consecutive", "--interchange_masked_token_only", "--interchange_max_token", "3"],
            "--interchange_max_token does not apply with --interchange_masked_token_only",
        ),
        (["--clm", "--restrict_ce_to_mask"], "--restrict_ce_to_mask needs --mlm"),
    ],
)
def test_flags_that_would_do_nothing_are_refused_before_any_work(monkeypatch, small_run_argv, tmp_path, flags, message):
    monkeypatch.setattr(causal_train, "load_teacher", lambda args: pytest.fail("the teacher was loaded"))
    argv = small_run_argv(*[f for f in flags if f not in ("--no_consecutive", "--clm")])
    if "--no_consecutive" in flags:
        argv.remove("--interchange_consecutive_only")
    if "--clm" in flags:
        argv = clm_argv(argv)
    with pytest.raises(UserError, match=message):
        causal_train.main(argv)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "flags, warning",
    [
        (["--alpha_causal_ce", "0"], "--interchange_consecutive_only, --neuron_mapping: no effect without a causal"),
        (["--data_augment"], "--neuron_mapping: no effect with --data_augment"),
        (["--restrict_ce_to_mask", "--alpha_ce", "0", "--alpha_causal_ce", "0"], "--restrict_ce_to_mask: no effect"),
        (["--clm"], "--token_counts: no effect without --mlm"),
    ],
)
def test_flags_without_effect_at_these_weights_are_warned_about(small_run_argv, flags, warning):
    argv = small_run_argv(*[f for f in flags if f != "--clm"])
    if "--clm" in flags:
        argv = clm_argv(argv)
    config, options = causal_train.parse_args(argv)
    assert any(warning in line for line in causal_train.warn_idle_flags(config, options))
    assert causal_train.warn_idle_flags(*causal_train.parse_args(small_run_argv())) == []  # the recipe: none


def test_an_interchange_prop_too_small_for_the_corpus_is_refused(small_run_argv, tmp_path):
    with pytest.raises(UserError, match=r"--interchange_prop 0.01 interchanges no position: the longest sequence"):
        causal_train.main(small_run_argv("--interchange_prop", "0.01"))
    assert not (tmp_path / "results").exists()


# --- run files on a full disk, the --force race ------------------------------------------------------------


def test_a_full_disk_while_saving_the_tokenizer_keeps_the_earlier_files(monkeypatch, small_run_argv, tmp_path):
    from transformers import PreTrainedTokenizerBase

    def half_then_full(self, folder, **kwargs):
        (Path(folder) / "tokenizer.json").write_text('{"version": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", half_then_full)
    with pytest.raises(UserError, match=r"cannot write the tokenizer files in .*run: No space left on device") as e:
        causal_train.main(small_run_argv())
    assert "\n" not in str(e.value)
    run = tmp_path / "results" / "run"
    assert {"parameters.json", "config.json", ".causal_train_run"} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.startswith(("tokenizer", "vocab", ".saving"))]


def test_a_full_disk_while_resuming_keeps_the_previous_parameters(monkeypatch, copied_run):
    argv, run = copied_run
    before = (run / "parameters.json").read_bytes()
    write_text = Path.write_text

    def full_for_parameters(self, *args, **kwargs):
        if self.name.startswith(".parameters.json."):  # the atomic write's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_parameters)
    with pytest.raises(UserError, match=r"cannot write .*parameters.json: No space left on device"):
        causal_train.main(resume_argv(argv, "--max_steps", "2"))
    assert (run / "parameters.json").read_bytes() == before
    assert not list(run.glob(".parameters.json.*"))


def test_a_full_disk_while_saving_a_checkpoint_folder_leaves_no_half_folder(monkeypatch, tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=16, n_heads=2, hidden_dim=32, n_layers=1))
    student_files.save_model_folder(student, None, tmp_path, 2, keep=2)

    def half_then_full(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(student), "save_pretrained", half_then_full)
    with pytest.raises(OSError):
        student_files.save_model_folder(student, None, tmp_path, 4, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def options_for(argv: list[str]):
    return causal_train.parse_args(argv)[1]


def other_run_made(path: Path, hold_lock: bool):
    """A check_run_dir after which another run makes `path` (and, with `hold_lock`, keeps it)."""
    check = run_folders.check_run_dir

    def check_then_lose_the_race(p, options):
        check(p, options)
        path.mkdir(parents=True, exist_ok=True)
        (path / run_folders.RUN_MARKER).write_text(run_folders.RUN_MARKER_TEXT)
        (path / "parameters.json").write_text("{}")
        if hold_lock:
            fd = os.open(path / run_folders.RUN_LOCK, os.O_RDWR | os.O_CREAT)
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"4242 elsewhere\n")
            return fd
        return None

    return check_then_lose_the_race


@pytest.mark.parametrize("force", [False, True])
def test_a_run_folder_made_by_another_run_during_the_claim_is_refused_not_a_traceback(
    monkeypatch, small_run_argv, tmp_path, force
):
    run = tmp_path / "results" / "run"
    argv = small_run_argv() if force else [a for a in small_run_argv() if a != "--force"]
    fds = []
    race = other_run_made(run, hold_lock=force)
    monkeypatch.setattr(run_folders, "check_run_dir", lambda p, o: fds.append(race(p, o)))
    try:
        with pytest.raises(UserError) as e:
            run_folders._claim_dump_path(run, options_for(argv))
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        run_folders.release_run_locks()
    expected = "is in use by another run (pid 4242" if force else "already exists: pass --force"
    assert expected in str(e.value)
    assert (run / "parameters.json").read_text() == "{}"  # the other run's files are untouched


def test_force_empties_a_previous_run_in_place_under_its_lock(small_run_argv, tmp_path):
    run = tmp_path / "results" / "run"
    run.mkdir(parents=True)
    (run / run_folders.RUN_MARKER).write_text(run_folders.RUN_MARKER_TEXT)
    (run / "checkpoints").mkdir()
    (run / "parameters.json").write_text("{}")
    inode = run.stat().st_ino
    try:
        run_folders._claim_dump_path(run, options_for(small_run_argv()))
        assert sorted(p.name for p in run.iterdir()) == [run_folders.RUN_LOCK, run_folders.RUN_MARKER]
        assert run.stat().st_ino == inode  # the folder was never deleted: no moment without its lock
    finally:
        run_folders.release_run_locks()


# --- the quickstart's own marker ---------------------------------------------------------------------------


def test_the_quickstart_marks_its_folders_and_takes_over_only_its_own_old_ones(tmp_path):
    s = Settings()
    new = tmp_path / "new"
    pipeline.prepare_output_dir(new, s, force=False)
    assert (new / pipeline.OUTPUT_MARKER).is_file() and (new / "settings.json").is_file()
    pipeline.prepare_output_dir(new, s, force=False)  # its own folder: continued

    old = tmp_path / "old"  # made before the marker: settings.json and quickstart outputs only
    (old / "corpus").mkdir(parents=True)
    (old / "settings.json").write_text(json.dumps({"steps": s.steps}))
    pipeline.prepare_output_dir(old, s, force=False)
    assert (old / pipeline.OUTPUT_MARKER).is_file()

    for name, content, extra, message in [
        ("stranger", json.dumps({"steps": 3}), "notes.txt", "not a quickstart output folder .*it holds notes.txt"),
        ("foreign", json.dumps({"lr": 3}), None, "does not hold quickstart settings"),
        ("garbled", "{steps", None, "cannot read .*settings.json"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "settings.json").write_text(content)
        if extra:
            (folder / extra).write_text("mine")
        before = snapshot(folder)
        with pytest.raises(UserError, match=message):
            pipeline.prepare_output_dir(folder, s, force=True)
        assert snapshot(folder) == before


# --- memory ------------------------------------------------------------------------------------------------

HEAP_PROBE = """
import ctypes
from utils import trim_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
blocks = []
for _ in range(600):  # 60 MB of 100 kB blocks (under glibc's mmap threshold: from the heap), each touched
    b = libc.malloc(100_000)
    ctypes.memset(b, 1, 100_000)
    blocks.append(b)
for b in blocks[:-1]:
    libc.free(b)  # the last block pins the heap's top: glibc returns nothing by itself
before = rss_mb()
trim_heap()
print(before - rss_mb())
"""


def test_trim_heap_hands_freed_heap_pages_back_to_the_system():
    out = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert float(out.stdout) > 40  # MB returned of the 60 freed
