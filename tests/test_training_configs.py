"""Every file in training_configs/ loads: student configs build their model, mappings fit their models.

Pairing is by file name: a student config's family comes from its name prefix (`STUDENT_FAMILIES`);
a mapping `*_<N>.nm` is for N-layer students and is validated against every shipped student config
with N layers of its teacher (`MAPPING_TEACHERS`: by default the 12-layer base model of that
student's family; `smollm2-135m_*` mappings go with SmolLM2-135M students).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tr

from architectures import backbone, get_architecture, hidden_size, lm_head_logits, num_heads, num_layers
from neuron_mapping import deserialize_variable_name, load_neuron_mapping, parse_variable_name, validate_neuron_mapping
from scripts.extraction import teacher_layers as extraction_layers

CONFIG_DIR = Path(__file__).resolve().parent.parent / "training_configs"


def smollm2_135m_config() -> tr.LlamaConfig:
    """HuggingFaceTB/SmolLM2-135M(-Instruct), as its config.json / GGUF metadata give it."""
    return tr.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )


# name prefix -> (config class, LM model class, teacher config factory, teacher blocks)
STUDENT_FAMILIES = {
    "distilbert-": (tr.DistilBertConfig, tr.DistilBertForMaskedLM, tr.BertConfig, 12),
    "distilroberta-": (tr.RobertaConfig, tr.RobertaForMaskedLM, tr.RobertaConfig, 12),
    "distilgpt2": (tr.GPT2Config, tr.GPT2LMHeadModel, tr.GPT2Config, 12),
    "smollm2-135m-": (tr.LlamaConfig, tr.LlamaForCausalLM, smollm2_135m_config, 30),
}
# mapping name prefix -> the student config prefix it is for (other mappings: students of no listed prefix)
MAPPING_TEACHERS = {"smollm2-135m_": "smollm2-135m-"}

# The values the original README and the Hugging Face distillation example rely on.
EXPECTED = {
    "distilbert-base-uncased.json": {"n_layers": 6, "dim": 768, "n_heads": 12, "vocab_size": 30522},
    "distilbert-base-uncased-large.json": {"n_layers": 6, "dim": 768, "n_heads": 12, "vocab_size": 30522},
    "distilbert-base-uncased-tiny.json": {"n_layers": 1, "dim": 768, "vocab_size": 30522},
    "distilbert-base-uncased-small.json": {"n_layers": 3, "dim": 768, "vocab_size": 30522},
    "distilbert-base-uncased-9-layers.json": {"n_layers": 9, "dim": 768, "vocab_size": 30522},
    "distilbert-base-cased.json": {"n_layers": 6, "vocab_size": 28996},
    "distilbert-base-multilingual-cased.json": {"n_layers": 6, "vocab_size": 119547},
    "distilroberta-base.json": {
        "num_hidden_layers": 6,
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
    },
    "distilgpt2.json": {"n_layer": 6, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
    # A 10-block student of SmolLM2-135M: the teacher's widths, GQA, rotary base and tied embeddings.
    "smollm2-135m-10-layers.json": {
        "model_type": "llama",
        "num_hidden_layers": 10,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
    },
    # The decoder quickstart's student: 15 blocks chosen by block influence (docs/quickstart.md).
    "smollm2-135m-15-layers.json": {"model_type": "llama", "num_hidden_layers": 15, "hidden_size": 576},
}

CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
MAPPING_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.nm"))


def _family(name: str):
    matches = [family for prefix, family in STUDENT_FAMILIES.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"{name}: no student family for this file name; add one to STUDENT_FAMILIES"
    return matches[0]


def _student_config(name: str):
    config_class = _family(name)[0]
    return config_class.from_json_file(CONFIG_DIR / name)  # as causal_train.py loads it


def test_every_file_in_training_configs_is_a_config_or_a_mapping():
    others = [p.name for p in CONFIG_DIR.iterdir() if p.suffix not in (".json", ".nm")]
    assert others == []
    assert set(CONFIG_FILES) == set(EXPECTED), "a shipped config has no expected values here (or one is missing)"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_student_config_has_expected_values(name):
    raw = json.loads((CONFIG_DIR / name).read_text())
    for key, value in EXPECTED[name].items():
        assert raw[key] == value, f"{name}: {key}"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_student_config_builds_its_model_on_meta(name):
    model_class = _family(name)[1]
    config = _student_config(name)
    with torch.device("meta"):
        model = model_class(config)
    assert num_layers(model) == len(backbone(model).get_submodule(get_architecture(model).blocks))
    assert hidden_size(model) % num_heads(model) == 0
    assert lm_head_logits(model, torch.empty(2, hidden_size(model), device="meta")).shape == (
        2,
        config.vocab_size,
    )


@pytest.mark.parametrize("name", MAPPING_FILES)
def test_neuron_mapping_fits_teacher_and_every_student_it_is_meant_for(name):
    match = re.search(r"_(\d+)\.nm$", name)
    assert match, f"{name}: mapping names end in _<student layers>.nm"
    n_layers = int(match.group(1))
    own = [p for m, p in MAPPING_TEACHERS.items() if name.startswith(m)]
    students = [
        c
        for c in CONFIG_FILES
        if num_layers(_student_config(c)) == n_layers
        and (c.startswith(own[0]) if own else not c.startswith(tuple(MAPPING_TEACHERS.values())))
    ]
    assert students, f"{name}: no shipped {n_layers}-layer student config"
    mapping = load_neuron_mapping(CONFIG_DIR / name)
    for student in students:
        _, _, teacher_factory, teacher_blocks = _family(student)
        teacher_config = teacher_factory()  # BERT-side: library defaults, the 12-layer, 768-wide base model
        assert num_layers(teacher_config) == teacher_blocks
        validate_neuron_mapping(mapping, teacher_config, _student_config(student), path=name)


@pytest.mark.parametrize("layers", [3, 6, 9])
def test_every_student_depth_has_single_and_multi_layer_mappings(layers):
    for stem in ("single_middle_layer", "multiple_single_multilayer_layer", "multiple_single_layer"):
        assert f"{stem}_{layers}.nm" in MAPPING_FILES


@pytest.mark.parametrize("layers", [3, 6, 9])
def test_multilayer_mapping_covers_every_student_layer_once(layers):
    mapping = load_neuron_mapping(CONFIG_DIR / f"multiple_single_multilayer_layer_{layers}.nm")
    student_layers = [parse_variable_name(deserialize_variable_name(s[0])[0])[0] for _, s in mapping]
    teacher_layers = [parse_variable_name(n)[0] for t, _ in mapping for n in deserialize_variable_name(t[0])[::12]]
    assert student_layers == list(range(layers))
    assert teacher_layers == list(range(12))  # consecutive groups, in order, covering the teacher


def test_smollm2_multilayer_mapping_pairs_each_student_block_with_three_teacher_blocks():
    mapping = load_neuron_mapping(CONFIG_DIR / "smollm2-135m_multiple_single_multilayer_layer_10.nm")
    student_layers = [parse_variable_name(deserialize_variable_name(s[0])[0])[0] for _, s in mapping]
    teacher_layers = [parse_variable_name(n)[0] for t, _ in mapping for n in deserialize_variable_name(t[0])[::9]]
    assert student_layers == list(range(10))
    assert teacher_layers == list(range(30))


def test_smollm2_single_middle_mapping_pairs_a_block_with_its_extracted_copy():
    # The default extraction of 10 from 30 blocks copies teacher block 16 into student block 5: the
    # mapping aligns a student block with the very teacher block it started from, over the full width.
    [(teacher, student)] = load_neuron_mapping(CONFIG_DIR / "smollm2-135m_single_middle_layer_10.nm")
    assert extraction_layers(30, 10)[5] == 16
    assert teacher == ["$L:16$H:[0:9]$[0:64]"] and student == ["$L:5$H:[0:9]$[0:64]"]
    assert 9 * 64 == smollm2_135m_config().hidden_size


def test_smollm2_block_influence_mapping_pairs_the_middle_block_with_its_measured_copy():
    # The decoder quickstart's 15 blocks by block influence on its corpus: teacher blocks 0-2, 8-11, 20-24,
    # 27-29 (docs/quickstart.md); student block 7 is a copy of teacher block 20.
    chosen = [0, 1, 2, 8, 9, 10, 11, 20, 21, 22, 23, 24, 27, 28, 29]
    [(teacher, student)] = load_neuron_mapping(CONFIG_DIR / "smollm2-135m_block_influence_middle_layer_15.nm")
    assert teacher == [f"$L:{chosen[7]}$H:[0:9]$[0:64]"] and student == ["$L:7$H:[0:9]$[0:64]"]
