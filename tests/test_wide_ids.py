"""Token ids beyond 65,535 (Llama-3-style vocabularies): binarize -> count -> load keeps them intact in
both formats and both tokenization paths, and every reader and writer refuses ids it cannot hold."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO  # noqa: F401  (puts the repository on sys.path)

import token_store  # noqa: E402
from scripts import binarized_data, data_combinator, token_counts  # noqa: E402
from utils import UserError  # noqa: E402

LINES = [
    "The river ran low that summer, and the old mill stood silent.",
    "Children walked along the dry bed looking for stones.",
    "",
    "A teacher explained that water had shaped every one of those stones.",
    "The mill stood silent, and the river ran on.",
]
MODEL_VOCAB = 70_000
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB_SIZE = MODEL_VOCAB + 2  # the two special tokens are added tokens above the model vocabulary, as in Llama 3


@pytest.fixture(scope="module")
def wide_tokenizer(tmp_path_factory) -> Path:
    """A WordLevel tokenizer of 70,002 ids whose words all sit above 65,535; bos/eos are added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({piece for line in LINES for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(line)})
    fillers = MODEL_VOCAB - 1 - len(words)
    vocab = {"[UNK]": 0, **{f"filler{i}": 1 + i for i in range(fillers)}}
    vocab.update({w: 1 + fillers + i for i, w in enumerate(words)})
    assert len(vocab) == MODEL_VOCAB and min(vocab[w] for w in words) > 65_535
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([BOS, EOS])
    folder = tmp_path_factory.mktemp("wide") / "wide-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token="[UNK]").save_pretrained(
        folder
    )
    return folder


def expected(folder: Path) -> list[list[int]]:
    tokenizer, start, end = binarized_data.load_tokenizer("llama", str(folder))
    return sorted(tokenizer.encode(f"{start} {t.strip()} {end}", add_special_tokens=False) for t in LINES)


@pytest.mark.parametrize("fmt", ["pickle", "memmap"])
@pytest.mark.parametrize("fast", [False, True])
def test_ids_above_65535_survive_binarize_count_and_load(tmp_path, wide_tokenizer, fmt, fast):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    out = binarized_data.main(
        [
            "--file_path",
            str(corpus),
            "--tokenizer_type",
            "llama",
            "--tokenizer_name",
            str(wide_tokenizer),
            "--dump_file",
            str(tmp_path / "bin"),
            "--format",
            fmt,
            *(["--fast_process"] if fast else []),
        ]
    )
    store = token_store.load_sequences(out)
    seqs = sorted(s.tolist() for s in store)
    assert store.flat.dtype == np.int32 and store.flat.max() >= MODEL_VOCAB  # the added eos id, 70,001
    assert seqs == expected(wide_tokenizer)
    assert all(s[0] == MODEL_VOCAB and s[-1] == MODEL_VOCAB + 1 for s in seqs)
    assert sum(i > 65_535 for s in seqs for i in s) == sum(len(s) for s in seqs)  # every id is wide
    counts = token_counts.main(
        [
            "--data_file",
            str(out),
            "--token_counts_dump",
            str(tmp_path / "counts.pickle"),
            "--vocab_size",
            str(VOCAB_SIZE),
        ]
    )
    assert counts == np.bincount(np.concatenate([np.array(s) for s in seqs]), minlength=VOCAB_SIZE).tolist()
    token_store.check_vocab_range(store, VOCAB_SIZE, out)
    with pytest.raises(UserError, match=r"ids in \[\d+, 70001\], outside the vocabulary of size 65536"):
        token_store.check_vocab_range(store, 65_536, out)
    if fmt == "pickle":
        with open(out, "rb") as f:
            raw = pickle.load(f)  # our own file: still the original format, a list of int32 arrays
        assert isinstance(raw, list) and all(a.dtype == np.int32 for a in raw)


def test_width_rule_is_uint16_below_65536_ids_else_int32():
    assert token_store.token_dtype(30_522) == np.uint16 and token_store.token_dtype(65_535) == np.uint16
    assert token_store.token_dtype(65_536) == np.int32 and token_store.token_dtype(128_256) == np.int32
    with pytest.raises(UserError, match="does not fit in int32"):
        token_store.token_dtype(2**31 + 1)


@pytest.mark.parametrize("fmt", ["c.pickle", "c.tokens.npy"])
def test_writing_wide_ids_as_uint16_is_refused_not_wrapped(tmp_path, fmt):
    seqs = [np.array([1, 70_000, 2], dtype=np.int32)]
    with pytest.raises(UserError, match=r"span \[1, 70000\], which uint16 cannot hold"):
        token_store.save_sequences(seqs, tmp_path / fmt, dtype=np.uint16)
    with pytest.raises(UserError, match="need an integer dtype"):
        token_store.save_sequences(seqs, tmp_path / fmt, dtype=np.float32)
    assert list(tmp_path.iterdir()) == []


def test_readers_take_any_integer_dtype_and_mixed_pickles(tmp_path):
    # uint64 with a signed type: numpy's common type is float64; ours is int64.
    token_store.save_pickle(
        [np.array([5, 70_000, 6], dtype=np.uint64), np.array([5, 7, 6], dtype=np.int16)], tmp_path / "mixed.pickle"
    )
    store = token_store.load_sequences(tmp_path / "mixed.pickle")
    assert store.flat.dtype == np.int64 and [s.tolist() for s in store] == [[5, 70_000, 6], [5, 7, 6]]
    np.save(tmp_path / "u.tokens.npy", np.array([5, 70_000, 6], dtype=np.uint64))
    np.save(tmp_path / "u.offsets.npy", np.array([0, 3], dtype=np.int64))
    counts = token_counts.main(
        [
            "--data_file",
            str(tmp_path / "u.tokens.npy"),
            "--token_counts_dump",
            str(tmp_path / "u.counts"),
            "--vocab_size",
            "70001",
        ]
    )
    assert counts[70_000] == 1 and counts[5] == 1 and sum(counts) == 3


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([1.0, 2.0]), "not a 1-D integer numpy array"),
        (np.array([True, False]), "not a 1-D integer numpy array"),
        (np.array([[1, 2]], dtype=np.int32), "not a 1-D integer numpy array"),
    ],
)
def test_non_integer_ids_are_refused_in_both_formats(tmp_path, array, message):
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps([array]))
    with pytest.raises(UserError, match=message):
        token_store.load_sequences(tmp_path / "bad.pickle")
    np.save(tmp_path / "bad.tokens.npy", array)
    np.save(tmp_path / "bad.offsets.npy", np.array([0, array.size], dtype=np.int64))
    with pytest.raises(UserError, match=message):
        token_store.load_sequences(tmp_path / "bad.tokens.npy")


def test_negative_ids_are_refused_by_counts_and_combinator(tmp_path):
    token_store.save_pickle([np.array([1, -3, 2], dtype=np.int32)] * 2, tmp_path / "neg.pickle")
    with pytest.raises(UserError, match=r"negative token ids \(down to -3\)"):
        token_counts.main(
            [
                "--data_file",
                str(tmp_path / "neg.pickle"),
                "--token_counts_dump",
                str(tmp_path / "c.pickle"),
                "--vocab_size",
                "10",
            ]
        )
    with pytest.raises(UserError, match="negative token ids"):
        data_combinator.main(
            [
                "--file_path_left",
                str(tmp_path / "neg.pickle"),
                "--file_path_right",
                str(tmp_path / "neg.pickle"),
                "--dump_file",
                str(tmp_path / "both"),
            ]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neg.pickle"]


def test_combinator_writes_inputs_of_different_widths_in_the_wider_integer_type(tmp_path, caplog):
    token_store.save_pickle([np.array([1, 7, 2], dtype=np.uint16)], tmp_path / "narrow.pickle")
    token_store.save_memmap([np.array([1, 100_000, 2], dtype=np.int32)], tmp_path / "wide.tokens.npy")
    np.save(tmp_path / "huge.tokens.npy", np.array([1, 2**40, 2], dtype=np.uint64))
    np.save(tmp_path / "huge.offsets.npy", np.array([0, 3], dtype=np.int64))
    out = data_combinator.main(
        [
            "--file_path_left",
            str(tmp_path / "narrow.pickle"),
            "--file_path_right",
            str(tmp_path / "wide.tokens.npy"),
            "--dump_file",
            str(tmp_path / "ab"),
            "--format",
            "memmap",
        ]
    )
    store = token_store.load_sequences(out)
    assert store.flat.dtype == np.int32 and sorted(s.tolist() for s in store) == [[1, 7, 2], [1, 100_000, 2]]
    assert "writing int32" in caplog.text
    out = data_combinator.main(
        [
            "--file_path_left",
            str(tmp_path / "wide.tokens.npy"),
            "--file_path_right",
            str(tmp_path / "huge.tokens.npy"),
            "--dump_file",
            str(tmp_path / "wh"),
        ]
    )
    store = token_store.load_sequences(out)
    assert store.flat.dtype == np.int64 and sorted(s.tolist() for s in store) == [[1, 100_000, 2], [1, 2**40, 2]]
