"""The README's data commands: binarize (files, save_to_disk folders; fast and line-by-line), combine, count."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import token_store
from conftest import BERT_COUNTS, BERT_PICKLE, REPO
from scripts import binarized_data, data_combinator, token_counts
from utils import UserError

TEXT = """Distillation trains a small model to imitate a large one.
The student sees the teacher's soft predictions, not only the gold labels.

Interchange interventions swap a hidden state between two inputs.
A causal abstraction holds when the swapped states have the same effect in both models.
Researchers measure how often the student's counterfactual prediction matches the teacher's.
Short line.
Shuffling the corpus changes the order of examples but never their content.
""".splitlines()


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXT) + "\n")
    return path


def binarize(tokenizer_dir, *args: str) -> Path:
    return binarized_data.main(["--tokenizer_type", "bert", "--tokenizer_name", str(tokenizer_dir), *args])


def as_lists(path: Path) -> list[list[int]]:
    return [s.tolist() for s in token_store.load_sequences(path)]


def test_text_file_lines_become_cls_text_sep_ids(tmp_path, text_file, bert_tokenizer_dir):
    from transformers import AutoTokenizer

    out = binarize(bert_tokenizer_dir, "--file_path", str(text_file), "--dump_file", str(tmp_path / "bin"))
    assert out == tmp_path / f"bin.train.{bert_tokenizer_dir.name}.pickle"
    with open(out, "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw, list) and all(a.dtype == np.uint16 for a in raw) and len(raw) == len(TEXT)
    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    expected = sorted(tok.encode(f"[CLS] {t.strip()} [SEP]", add_special_tokens=False) for t in TEXT)
    assert sorted(a.tolist() for a in raw) == expected
    assert [101, 102] in expected  # the empty line is kept as [CLS] [SEP], as the original did


def test_fast_path_gives_the_same_ids_and_order_as_line_by_line(tmp_path, text_file, bert_tokenizer_dir):
    slow = binarize(bert_tokenizer_dir, "--file_path", str(text_file), "--dump_file", str(tmp_path / "slow"))
    fast = binarize(bert_tokenizer_dir, "--file_path", str(text_file), "--dump_file", str(tmp_path / "fast"),
                    "--fast_process", "--preprocessing_num_workers", "2")
    assert as_lists(slow) == as_lists(fast)


def test_shuffle_follows_the_seed(tmp_path, text_file, bert_tokenizer_dir):
    runs = [as_lists(binarize(bert_tokenizer_dir, "--file_path", str(text_file), "--dump_file",
                              str(tmp_path / f"s{i}"), "--seed", str(seed))) for i, seed in enumerate((1, 1, 2))]
    assert runs[0] == runs[1] and runs[0] != runs[2] and sorted(runs[0]) == sorted(runs[2])


def test_save_to_disk_folder_split_and_field(tmp_path, bert_tokenizer_dir):
    import datasets

    folder = tmp_path / "wikitext-15M"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": TEXT, "id": list(range(len(TEXT)))}),
        "validation": datasets.Dataset.from_dict({"body": TEXT[:2], "id": [0, 1]}),
    }).save_to_disk(str(folder))
    out = binarize(bert_tokenizer_dir, "--file_path", str(folder), "--split", "validation", "--field_name", "body",
                   "--max_parsing_example", "1", "--dump_file", str(tmp_path / "b"), "--format", "memmap")
    assert out.name.endswith(".validation.model.tokens.npy") and len(as_lists(out)) == 1
    with pytest.raises(UserError, match="split 'test' not in .*available: train, validation"):
        binarize(bert_tokenizer_dir, "--file_path", str(folder), "--split", "test", "--field_name", "body")
    with pytest.raises(UserError, match="field 'text' not in the data; available: body, id"):
        binarize(bert_tokenizer_dir, "--file_path", str(folder))


def test_pickle_and_memmap_outputs_hold_the_same_sequences(tmp_path, text_file, bert_tokenizer_dir):
    a = binarize(bert_tokenizer_dir, "--file_path", str(text_file), "--dump_file", str(tmp_path / "a"))
    b = binarize(bert_tokenizer_dir, "--file_path", str(text_file), "--dump_file", str(tmp_path / "a"),
                 "--format", "memmap")
    assert as_lists(a) == as_lists(b)


def test_combine_then_count_like_the_readme(tmp_path, shared_data):
    out = data_combinator.main([
        "--file_path_left", str(BERT_PICKLE), "--file_path_right", str(BERT_PICKLE), "--split", "train",
        "--tokenizer_name", "bert-base-uncased", "--dump_file", str(tmp_path / "both" / "binarized_text"),
    ])
    assert out == tmp_path / "both" / "binarized_text.train.bert-base-uncased.pickle"
    combined = token_store.load_sequences(out)
    single = token_store.load_sequences(BERT_PICKLE)
    assert len(combined) == 2000 and sorted(map(tuple, combined)) == sorted(map(tuple, list(single) * 2))
    counts_path = tmp_path / "counts.pickle"
    counts = token_counts.main(["--data_file", str(out), "--token_counts_dump", str(counts_path), "--vocab_size", "30522"])
    reference = token_store.safe_load_pickle(BERT_COUNTS)
    assert counts == [2 * c for c in reference] and token_store.safe_load_pickle(counts_path) == counts


def test_token_counts_of_the_real_data_equal_the_original_file(tmp_path, shared_data):
    out = tmp_path / "counts.pickle"
    token_counts.main(["--data_file", str(BERT_PICKLE), "--token_counts_dump", str(out)])
    assert out.read_bytes() == BERT_COUNTS.read_bytes()


def test_ids_outside_the_vocabulary_are_refused_without_output(tmp_path, shared_data):
    out = tmp_path / "counts.pickle"
    with pytest.raises(UserError, match="outside the vocabulary of size 1000"):
        token_counts.main(["--data_file", str(BERT_PICKLE), "--token_counts_dump", str(out), "--vocab_size", "1000"])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_large_vocabularies_use_int32(tmp_path):
    assert token_store.token_dtype(30522) == np.uint16 and token_store.token_dtype(65536) == np.int32
    token_store.save_pickle([np.array([1, 70000, 2], dtype=np.int32)], tmp_path / "big.pickle")
    assert token_store.load_sequences(tmp_path / "big.pickle").flat.dtype == np.int32


def test_gpt2_and_roberta_framing(tmp_path, text_file):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT * 5, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    for kind, cls, start, end in (("gpt2", GPT2TokenizerFast, "<|endoftext|>", "<|endoftext|>"),
                                  ("roberta", RobertaTokenizerFast, "<s>", "</s>")):
        folder = tmp_path / kind
        tok = cls(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"),
                  **({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"} if kind == "gpt2" else {}))
        tok.save_pretrained(folder)
        out = binarized_data.main(["--file_path", str(text_file), "--tokenizer_type", kind, "--tokenizer_name",
                                   str(folder), "--dump_file", str(tmp_path / kind / "bin"), "--fast_process"])
        seqs = as_lists(out)
        start_id, end_id = tok.convert_tokens_to_ids(start), tok.convert_tokens_to_ids(end)
        assert all(s[0] == start_id and s[-1] == end_id for s in seqs)
        expected = sorted(tok.encode(f"{start} {t.strip()} {end}", add_special_tokens=False) for t in TEXT)
        assert sorted(seqs) == expected


@pytest.mark.parametrize("args, message", [
    (["--file_path", "/nonexistent/corpus.txt"], "--file_path not found"),
    (["--file_path", "x", "--dataset_name", "wikitext"], "exactly one of"),
    (["--tokenizer_name", "/nonexistent/tokenizer"], "cannot load tokenizer"),
])
def test_bad_binarization_input_is_refused(tmp_path, bert_tokenizer_dir, args, message):
    base = ["--tokenizer_type", "bert", "--tokenizer_name", str(bert_tokenizer_dir), "--dump_file", str(tmp_path / "o")]
    with pytest.raises(UserError, match=message):
        binarized_data.main(base + args)
    assert not list(tmp_path.iterdir())


def test_cli_error_is_one_line_with_exit_status_2(tmp_path):
    corrupt = tmp_path / "corrupt.pickle"
    corrupt.write_bytes(b"\x80\x04garbage")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "token_counts.py"), "--data_file", str(corrupt),
         "--token_counts_dump", str(tmp_path / "c.pickle")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "c.pickle").exists()
