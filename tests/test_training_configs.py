"""Every file in training_configs/ loads: student configs build their model, mappings fit their models.

Pairing is by file name: a student config's family comes from its name prefix (`STUDENT_FAMILIES`);
a mapping `*_<N>.nm` is for N-layer students and is validated against every shipped student config
with N layers, with the 12-layer base model of that student's family as the teacher.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tr

import counterfactual_utils as cu

CONFIG_DIR = Path(__file__).resolve().parent.parent / "training_configs"

# name prefix -> (config class, LM model class, teacher config: the 12-layer model it is distilled from)
STUDENT_FAMILIES = {
    "distilbert-": (tr.DistilBertConfig, tr.DistilBertForMaskedLM, tr.BertConfig),
    "distilroberta-": (tr.RobertaConfig, tr.RobertaForMaskedLM, tr.RobertaConfig),
    "distilgpt2": (tr.GPT2Config, tr.GPT2LMHeadModel, tr.GPT2Config),
}

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
        "num_hidden_layers": 6, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
        "pad_token_id": 1,
    },
    "distilgpt2.json": {"n_layer": 6, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}

CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
MAPPING_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.nm"))


def _family(name: str):
    matches = [family for prefix, family in STUDENT_FAMILIES.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"{name}: no student family for this file name; add one to STUDENT_FAMILIES"
    return matches[0]


def _student_config(name: str):
    config_class, _, _ = _family(name)
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
    _, model_class, _ = _family(name)
    config = _student_config(name)
    with torch.device("meta"):
        model = model_class(config)
    assert cu.num_layers(model) == len(cu.backbone(model).get_submodule(cu.get_adapter(model).blocks))
    assert cu.hidden_size(model) % cu.num_heads(model) == 0
    assert cu.lm_head_logits(model, torch.empty(2, cu.hidden_size(model), device="meta")).shape == (
        2,
        config.vocab_size,
    )


@pytest.mark.parametrize("name", MAPPING_FILES)
def test_neuron_mapping_fits_teacher_and_every_student_it_is_meant_for(name):
    match = re.search(r"_(\d+)\.nm$", name)
    assert match, f"{name}: mapping names end in _<student layers>.nm"
    n_layers = int(match.group(1))
    students = [c for c in CONFIG_FILES if cu.num_layers(_student_config(c)) == n_layers]
    assert students, f"{name}: no shipped {n_layers}-layer student config"
    mapping = cu.load_neuron_mapping(CONFIG_DIR / name)
    for student in students:
        teacher_config = _family(student)[2]()  # library defaults: the 12-layer, 768-wide base model
        assert cu.num_layers(teacher_config) == 12
        cu.validate_neuron_mapping(mapping, teacher_config, _student_config(student), path=name)


@pytest.mark.parametrize("layers", [3, 6, 9])
def test_every_student_depth_has_single_and_multi_layer_mappings(layers):
    for stem in ("single_middle_layer", "multiple_single_multilayer_layer", "multiple_single_layer"):
        assert f"{stem}_{layers}.nm" in MAPPING_FILES


@pytest.mark.parametrize("layers", [3, 6, 9])
def test_multilayer_mapping_covers_every_student_layer_once(layers):
    mapping = cu.load_neuron_mapping(CONFIG_DIR / f"multiple_single_multilayer_layer_{layers}.nm")
    student_layers = [cu.parse_variable_name(cu.deserialize_variable_name(s[0])[0])[0] for _, s in mapping]
    teacher_layers = [
        cu.parse_variable_name(n)[0] for t, _ in mapping for n in cu.deserialize_variable_name(t[0])[::12]
    ]
    assert student_layers == list(range(layers))
    assert teacher_layers == list(range(12))  # consecutive groups, in order, covering the teacher
