"""The architecture table: every row's paths exist in its model, and its derived facts hold."""

from __future__ import annotations

import pytest
import torch
import transformers as tr
from conftest import DECODER_FAMILIES, tiny_decoder_config

from architectures import ARCHITECTURES, max_positions, special_token_ids, tokenizer_framing

SMALL = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=40,
)


def _tiny(family: str):
    if family in DECODER_FAMILIES:
        return tiny_decoder_config(family)
    if family == "distilbert":
        return tr.DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
    if family == "gpt2":
        return tr.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return getattr(tr, ARCHITECTURES[family].config_class)(**SMALL, pad_token_id=1)


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_every_path_of_a_row_exists_in_its_model(family):
    row = ARCHITECTURES[family]
    config = _tiny(family)
    assert config.model_type == family and isinstance(config, row.config_cls())
    model = row.lm_cls()(config)
    base = model.get_submodule(row.backbone)
    assert len(base.get_submodule(row.blocks)) == config.num_hidden_layers
    if row.final_norm is not None:
        assert isinstance(base.get_submodule(row.final_norm), torch.nn.Module)
    assert model.get_submodule(row.token_embeddings) is model.get_input_embeddings()
    for path in (row.position_embeddings, row.token_type_embeddings):
        if path is not None:
            assert isinstance(model.get_submodule(path), torch.nn.Embedding)
    assert (row.position_kind == "rotary") == (family in DECODER_FAMILIES)
    assert row.objective == ("mlm" if "MaskedLM" in row.lm_class else "clm")
    assert all(t in ARCHITECTURES and ARCHITECTURES[t].objective == row.objective for t in row.teachers)


@pytest.mark.parametrize("family", [f for f, r in ARCHITECTURES.items() if r.extraction is not None])
def test_extraction_layout_prefixes_name_keys_of_the_state_dict(family):
    layout = ARCHITECTURES[family].extraction
    keys = list(ARCHITECTURES[family].lm_cls()(_tiny(family)).state_dict())
    for prefix in layout.embeddings + layout.final_norm + layout.head + layout.head_transform:
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix
    assert any(k.startswith(layout.blocks + ".1.") for k in keys)


def test_framing_per_family():
    assert tokenizer_framing("bert") == ("BertTokenizer", "cls_token", "sep_token")
    assert tokenizer_framing("gpt2") == ("GPT2Tokenizer", "bos_token", "eos_token")
    assert tokenizer_framing("llama") == ("AutoTokenizer", "bos_token", "eos_token")
    assert tokenizer_framing("qwen3") == ("AutoTokenizer", None, "eos_token")


def test_max_positions_reserves_roberta_padding_only():
    assert max_positions(tr.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_positions(tr.GPT2Config(n_positions=1024)) == 1024
    assert max_positions(tiny_decoder_config("llama", max_positions=8192)) == 8192


def test_special_token_ids_leave_out_undefined_tokens(tmp_path):
    from conftest import save_word_level_tokenizer

    expected = save_word_level_tokenizer(tmp_path, 50, with_bos=False)
    ids = special_token_ids(tr.AutoTokenizer.from_pretrained(tmp_path))
    assert ids == expected and "bos_token" not in ids


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_decoder_students_have_no_dropout_unless_attention_dropout_is_set(family):
    from conftest import tiny_decoder_config

    from architectures import has_dropout

    lm_cls = ARCHITECTURES[family].lm_cls()
    assert not has_dropout(lm_cls(tiny_decoder_config(family)))
    assert has_dropout(lm_cls(tiny_decoder_config(family, attention_dropout=0.1)))


def test_dropout_modules_count_and_unused_head_rates_do_not():
    from transformers import DistilBertConfig, DistilBertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from architectures import has_dropout

    small = dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    gpt2 = GPT2LMHeadModel(GPT2Config(**small, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert gpt2.config.summary_first_dropout > 0 and not has_dropout(gpt2)  # a head the distiller never runs
    assert has_dropout(GPT2LMHeadModel(GPT2Config(**small, attn_pdrop=0.1, resid_pdrop=0.0, embd_pdrop=0.0)))
    tiny = dict(vocab_size=50, dim=16, hidden_dim=32, n_layers=1, n_heads=2, max_position_embeddings=16)
    assert not has_dropout(DistilBertForMaskedLM(DistilBertConfig(**tiny, dropout=0.0, attention_dropout=0.0)))
    assert has_dropout(DistilBertForMaskedLM(DistilBertConfig(**tiny, dropout=0.1, attention_dropout=0.0)))
