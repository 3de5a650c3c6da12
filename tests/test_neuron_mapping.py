"""Tests for neuron_mapping: the NAME grammar, `.nm` files, validation against configs, sampling."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import transformers as tr

from neuron_mapping import (
    deserialize_variable_name,
    load_neuron_mapping,
    parse_variable_name,
    sample_interchange_variables,
    validate_neuron_mapping,
)
from utils import UserError

# ----------------------------------------------------------------------------------------------- grammar


def test_deserialize_expands_layers_times_heads_with_same_slice():
    names = deserialize_variable_name("$L:[0:2]$H:[0:12]$[0:64]")
    assert len(names) == 24
    assert names[0] == "$L:0$H:0$[0:64]"
    assert names[1] == "$L:0$H:1$[0:64]"
    assert names[12] == "$L:1$H:0$[0:64]"
    assert names[-1] == "$L:1$H:11$[0:64]"


def test_deserialize_of_single_name_is_that_name():
    assert deserialize_variable_name("$L:3$H:2$[8:16]") == ["$L:3$H:2$[8:16]"]


def test_deserialize_expands_head_range_of_one_layer():
    assert deserialize_variable_name("$L:6$H:[3:5]$[0:4]") == ["$L:6$H:3$[0:4]", "$L:6$H:4$[0:4]"]


@pytest.mark.parametrize(
    "name",
    [
        "L:3$H:2$[0:64]",
        "$L:3$H:2",
        "$L:3$H:2$[0:64",
        "$L:x$H:2$[0:64]",
        "$L:[2:2]$H:0$[0:64]",
        "$L:1$H:[4:1]$[0:64]",
        "$L:1$H:0$[8:8]",
        "$L:-1$H:0$[0:64]",
        " $L:1$H:0$[0:64]",
        "",
    ],
)
def test_malformed_name_is_refused_naming_it(name):
    with pytest.raises(UserError, match="malformed variable name") as err:
        deserialize_variable_name(name)
    assert repr(name) in str(err.value)


def test_parse_variable_name_returns_layer_head_and_slice():
    assert parse_variable_name("$L:4$H:11$[16:48]") == (4, 11, slice(16, 48))


def test_parse_variable_name_slice_indexes_a_tensor_like_the_originals_np_s():
    # Code written against the original slices a head's dims with the third item directly.
    head_dims = torch.arange(64.0).expand(2, 3, 64)  # (bs, seq, head_dim)
    layer, head, loc = parse_variable_name("$L:2$H:5$[16:48]")
    assert torch.equal(head_dims[..., loc], head_dims[..., 16:48])
    assert loc == np.s_[16:48]
    assert (loc.stop - loc.start, layer, head) == (32, 2, 5)


def test_parse_variable_name_refuses_a_range_name():
    with pytest.raises(UserError, match=r"\$L:\[0:2\]"):
        parse_variable_name("$L:[0:2]$H:0$[0:64]")


# ----------------------------------------------------------------------------------------------- mappings

TEACHER = tr.BertConfig()  # bert-base: 12 layers, 12 heads of 64
STUDENT = tr.DistilBertConfig(n_layers=6)


def _write_mapping(tmp_path, entries, name="m.nm"):
    path = tmp_path / name
    path.write_text(json.dumps({"interchange_variable_mappings": entries}))
    return path


def _entry(teacher, student):
    return {"teacher_variable_names": teacher, "student_variable_names": student}


def test_load_neuron_mapping_reads_entries_as_written(tmp_path):
    path = _write_mapping(tmp_path, [_entry(["$L:[0:2]$H:[0:12]$[0:64]"], ["$L:0$H:[0:12]$[0:64]"])])
    assert load_neuron_mapping(path) == [(["$L:[0:2]$H:[0:12]$[0:64]"], ["$L:0$H:[0:12]$[0:64]"])]


def test_missing_mapping_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="nope.nm"):
        load_neuron_mapping(tmp_path / "nope.nm")


def test_non_json_mapping_is_refused(tmp_path):
    path = tmp_path / "bad.nm"
    path.write_text("{not json")
    with pytest.raises(UserError, match="bad.nm is not valid JSON"):
        load_neuron_mapping(path)


def test_mapping_without_top_key_is_refused(tmp_path):
    path = tmp_path / "nokey.nm"
    path.write_text(json.dumps({"mappings": []}))
    with pytest.raises(UserError, match="nokey.nm has no 'interchange_variable_mappings'"):
        load_neuron_mapping(path)


def test_empty_mapping_is_refused(tmp_path):
    with pytest.raises(UserError, match="m.nm.*non-empty list"):
        load_neuron_mapping(_write_mapping(tmp_path, []))


def test_entry_without_student_key_is_refused(tmp_path):
    path = _write_mapping(tmp_path, [{"teacher_variable_names": ["$L:6$H:0$[0:64]"]}])
    with pytest.raises(UserError, match="entry 0 has no 'student_variable_names'"):
        load_neuron_mapping(path)


def test_entry_with_no_variables_is_refused(tmp_path):
    path = _write_mapping(tmp_path, [_entry(["$L:6$H:0$[0:64]"], ["$L:1$H:0$[0:64]"]), _entry([], ["$L:1$H:0$[0:64]"])])
    with pytest.raises(UserError, match="entry 1 'teacher_variable_names' must be a non-empty list"):
        load_neuron_mapping(path)


def test_malformed_name_in_mapping_is_refused_naming_file_entry_and_name(tmp_path):
    path = _write_mapping(tmp_path, [_entry(["$L:6$H:0$[0:64]"], ["$L:1$H:0[0:64]"])])
    with pytest.raises(UserError, match=r"m\.nm: entry 0: malformed variable name '\$L:1\$H:0\[0:64\]'"):
        load_neuron_mapping(path)


def test_validate_accepts_the_original_single_middle_mapping():
    validate_neuron_mapping([(["$L:6$H:[0:12]$[0:64]"], ["$L:3$H:[0:12]$[0:64]"])], TEACHER, STUDENT)


def test_validate_refuses_an_empty_mapping():
    with pytest.raises(UserError, match="x.nm is empty"):
        validate_neuron_mapping([], TEACHER, STUDENT, path="x.nm")


def test_validate_refuses_an_entry_with_no_student_variables():
    with pytest.raises(UserError, match="entry 0 has no student variables"):
        validate_neuron_mapping([(["$L:6$H:0$[0:64]"], [])], TEACHER, STUDENT, path="x.nm")


@pytest.mark.parametrize(
    "teacher, student, message",
    [
        ("$L:12$H:0$[0:64]", "$L:0$H:0$[0:64]", r"teacher variable '\$L:12\$H:0\$\[0:64\]': layer 12 >= the"),
        ("$L:6$H:0$[0:64]", "$L:[4:7]$H:0$[0:64]", r"student variable '\$L:\[4:7\]\$H:0\$\[0:64\]': layer 6 >= the"),
        ("$L:6$H:[0:13]$[0:64]", "$L:0$H:0$[0:64]", r"head 12 >= the teacher's 12 heads"),
        ("$L:6$H:0$[0:64]", "$L:0$H:12$[0:64]", r"student variable '\$L:0\$H:12\$\[0:64\]': head 12"),
        ("$L:6$H:0$[0:65]", "$L:0$H:0$[0:64]", r"slice \[0:65\] exceeds the teacher's head size 64"),
    ],
)
def test_validate_refuses_a_variable_that_does_not_fit_naming_it(teacher, student, message):
    mapping = [(["$L:0$H:0$[0:64]"], ["$L:0$H:0$[0:64]"]), ([teacher], [student])]
    with pytest.raises(UserError, match=r"x\.nm: entry 1 .*" + message):
        validate_neuron_mapping(mapping, TEACHER, STUDENT, path="x.nm")


def test_validate_checks_each_side_against_its_own_config_style():
    small_gpt2 = tr.GPT2Config(n_layer=2, n_head=4, n_embd=32)  # head size 8
    with pytest.raises(UserError, match=r"slice \[0:16\] exceeds the student's head size 8"):
        validate_neuron_mapping([(["$L:6$H:0$[0:16]"], ["$L:1$H:3$[0:16]"])], TEACHER, small_gpt2)


def test_validate_allows_teacher_and_student_widths_to_differ():
    # Each model intervenes with its own source values, so widths only need to fit each model.
    validate_neuron_mapping([(["$L:6$H:0$[0:64]"], ["$L:1$H:0$[0:32]"])], TEACHER, STUDENT)


def test_sampling_is_identical_for_equal_seeds_and_covers_every_entry():
    mapping = [
        (["$L:0$H:0$[0:64]", "$L:1$H:0$[0:64]"], ["$L:0$H:[0:2]$[0:64]"]),
        (["$L:[2:4]$H:0$[0:64]"], ["$L:1$H:0$[0:64]", "$L:2$H:0$[0:64]"]),
    ]
    rng_a, rng_b = random.Random(7), random.Random(7)
    draws_a = [sample_interchange_variables(mapping, rng_a) for _ in range(50)]
    draws_b = [sample_interchange_variables(mapping, rng_b) for _ in range(50)]
    assert draws_a == draws_b
    teachers = {tuple(t) for t, _ in draws_a}
    assert teachers == {("$L:0$H:0$[0:64]",), ("$L:1$H:0$[0:64]",), ("$L:2$H:0$[0:64]", "$L:3$H:0$[0:64]")}
    assert (["$L:0$H:0$[0:64]", "$L:0$H:1$[0:64]"]) in [s for _, s in draws_a]


def test_sampling_accepts_a_numpy_generator():
    mapping = [(["$L:6$H:[0:2]$[0:64]"], ["$L:3$H:0$[0:64]"])]
    teacher, student = sample_interchange_variables(mapping, np.random.default_rng(0))
    assert teacher == ["$L:6$H:0$[0:64]", "$L:6$H:1$[0:64]"] and student == ["$L:3$H:0$[0:64]"]
