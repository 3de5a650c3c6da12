"""Layer selection by measured importance: the scores, the rules that pick blocks from them, the CLI and its errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import transformers as tr
from conftest import save_tiny_decoder_teacher, tiny_decoder_config

import layer_selection as ls
from architectures import get_architecture
from scripts import extract, extract_distilbert
from token_store import save_sequences
from utils import UserError

LENGTHS = (5, 9, 12, 3, 7, 11, 4, 8, 6, 10)  # more than one batch, of unequal lengths (padding)


def _tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = tr.GPT2Config(vocab_size=120, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    elif family == "bert":
        config = tr.BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    else:
        config = tiny_decoder_config(family, layers=4)
    return get_architecture(config).lm_cls()(config).eval()


def _sequences(lengths=LENGTHS, high: int = 120) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(4, high, n).astype(np.uint16) for n in lengths]


def _without_final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose final norm is the identity, so its last `hidden_states` entry is the last block's output."""
    row = get_architecture(model)
    plain = copy.deepcopy(model)
    if row.final_norm is not None:
        setattr(plain.get_submodule(row.backbone), row.final_norm, torch.nn.Identity())
    return plain


def _direct(model: torch.nn.Module, seqs, pairs, angular: bool) -> list[float]:
    """The mean over all tokens of each pair's distance, one unpadded sequence at a time."""
    plain = _without_final_norm(model)
    terms: list[list[torch.Tensor]] = [[] for _ in pairs]
    with torch.no_grad():
        for seq in seqs:
            hs = plain(input_ids=torch.as_tensor(seq.astype(np.int64))[None], output_hidden_states=True).hidden_states
            for k, (a, b) in enumerate(pairs):
                cos = torch.nn.functional.cosine_similarity(hs[a][0], hs[b][0], dim=-1).double()
                terms[k].append(torch.arccos(cos.clamp(-1, 1)) / math.pi if angular else 1 - cos)
    return [torch.cat(t).mean().item() for t in terms]


# ----------------------------------------------------------------------------------------------- the scores


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "bert"])
def test_last_block_output_is_read_before_the_final_norm(family):
    model = _tiny_model(family)
    ids = torch.randint(4, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        states = ls.block_states(model, ids, mask)
        normed = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        plain = _without_final_norm(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(states) == model.config.num_hidden_layers + 1
    for got, expected in zip(states, plain.hidden_states, strict=True):
        torch.testing.assert_close(got, expected)
    if get_architecture(model).final_norm is not None:  # the library's last entry is after the norm
        assert not torch.allclose(states[-1], normed[-1])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bert"])
def test_block_influence_equals_a_direct_computation_from_output_hidden_states(family):
    model = _tiny_model(family)
    seqs = _sequences()
    pairs = [(i, i + 1) for i in range(4)]
    scores, n_tokens = ls.mean_cosine_distances(model, seqs, pairs, angular=False)
    assert n_tokens == sum(LENGTHS)  # pads excluded
    np.testing.assert_allclose(scores, _direct(model, seqs, pairs, angular=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_angular_distance_equals_a_direct_computation_from_output_hidden_states(family):
    model = _tiny_model(family)
    seqs = _sequences()
    pairs = [(start, start + 2) for start in range(3)]
    scores, _ = ls.mean_cosine_distances(model, seqs, pairs, angular=True)
    np.testing.assert_allclose(scores, _direct(model, seqs, pairs, angular=True), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the rules


def test_block_influence_keeps_the_highest_scores_and_does_not_force_the_ends():
    # Block 0 and the last block have the lowest scores here: the rule drops them (the scores decide).
    assert ls.keep_by_block_influence([0.1, 0.5, 0.9, 0.2], 2) == [1, 2]
    assert ls.keep_by_block_influence([0.9, 0.1, 0.3, 0.8, 0.7], 3) == [0, 3, 4]
    assert ls.keep_by_block_influence([0.5, 0.5, 0.5], 2) == [0, 1]  # ties keep the earlier block
    assert ls.keep_by_block_influence([0.2, 0.1], 2) == [0, 1]


def test_angular_drops_the_contiguous_run_with_the_smallest_distance():
    # 6 blocks, keep 3: runs 0-2, 1-3, 2-4, 3-5; the smallest d(l, l+3) starts at 2.
    assert ls.keep_by_angular([0.4, 0.3, 0.1, 0.2], 6, 3) == [0, 1, 5]
    assert ls.keep_by_angular([0.2, 0.2, 0.3], 4, 2) == [2, 3]  # ties drop the earlier run
    assert ls.keep_by_angular([0.0] * 5, 4, 4) == [0, 1, 2, 3]  # nothing to drop


@pytest.mark.parametrize("method", ls.MEASURED)
def test_select_layers_applies_the_rule_to_the_measured_scores(tmp_path, method):
    model = _tiny_model("llama")
    seqs = _sequences()
    save_sequences(seqs, tmp_path / "cal.pickle")
    got = ls.select_layers(model, method, 2, str(tmp_path / "cal.pickle"), 6)
    pairs = [(i, i + 1) for i in range(4)] if method == "block_influence" else [(s, s + 2) for s in range(3)]
    expected = _direct(model, seqs[:6], pairs, angular=method == "angular")
    np.testing.assert_allclose(got.scores, expected, rtol=1e-5, atol=1e-6)
    if method == "block_influence":
        assert got.layers == sorted(np.argsort(-np.array(expected), kind="stable")[:2].tolist())
    else:
        start = int(np.argmin(expected))
        assert got.layers == [i for i in range(4) if not start <= i < start + 2]
    assert (got.n_sequences, got.n_tokens) == (6, sum(LENGTHS[:6]))


def test_calibration_takes_the_first_sequences_cut_to_the_teachers_positions(tmp_path):
    seqs = _sequences((3, 0, 70, 5))
    save_sequences(seqs, tmp_path / "cal.tokens.npy")
    got = ls.load_calibration(str(tmp_path / "cal.tokens.npy"), 2, vocab_size=120, max_length=64)
    assert [len(s) for s in got] == [3, 64]  # the empty one skipped, the long one cut
    np.testing.assert_array_equal(got[1], seqs[2][:64])


# ----------------------------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory):
    return save_tiny_decoder_teacher("llama", tmp_path_factory.mktemp("layersel") / "llama")


def _argv(teacher, out, *flags) -> list[str]:
    return ["--model_type", "llama", "--model_name", str(teacher), "--dump_checkpoint", str(out), *flags]


@pytest.mark.parametrize("fmt", ["pickle", "tokens.npy"])
def test_extract_copies_the_measured_blocks_and_writes_their_scores_beside_the_checkpoint(
    tmp_path, llama_teacher, fmt, caplog
):
    calibration = tmp_path / f"cal.{fmt}"
    save_sequences(_sequences(high=200), calibration)
    out = tmp_path / "student.pth"
    with caplog.at_level("INFO", logger="extract"):
        state = extract.main(
            _argv(llama_teacher, out, "--num_layers", "2", "--layer_selection", "block_influence")
            + ["--calibration_file", str(calibration), "--calibration_sequences", "4"]
        )
    report = json.loads((tmp_path / "student.layer_selection.json").read_text())
    teacher = tr.AutoModelForCausalLM.from_pretrained(llama_teacher)
    expected = ls.select_layers(teacher, "block_influence", 2, str(calibration), 4)
    assert report["method"] == "block_influence" and report["teacher_layers"] == expected.layers
    np.testing.assert_allclose(report["scores"], expected.scores, rtol=1e-6)
    assert report["calibration_sequences"] == 4 and report["calibration_tokens"] == sum(LENGTHS[:4])
    weights = teacher.state_dict()
    for s_idx, t_idx in enumerate(expected.layers):
        key = "model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(state[key.format(s_idx)], weights[key.format(t_idx)])
    logged = caplog.text
    assert all(f"block {i}: {score:.6f}" in logged for i, score in enumerate(expected.scores))
    assert f"Chosen teacher blocks: {expected.layers}" in logged


def test_teacher_layers_win_over_a_measured_selection(tmp_path, llama_teacher):
    save_sequences(_sequences(high=200), tmp_path / "cal.pickle")
    state = extract.main(
        _argv(llama_teacher, tmp_path / "s.pth", "--teacher_layers", "0,2", "--layer_selection", "angular")
        + ["--calibration_file", str(tmp_path / "cal.pickle")]
    )
    teacher = tr.AutoModelForCausalLM.from_pretrained(llama_teacher).state_dict()
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.2.mlp.up_proj.weight"])
    assert not (tmp_path / "s.layer_selection.json").exists()


def test_bert_to_distilbert_takes_a_measured_selection_too(tmp_path):
    _tiny_model("bert").save_pretrained(tmp_path / "bert")
    save_sequences(_sequences(), tmp_path / "cal.pickle")
    out = tmp_path / "d.pth"
    extract_distilbert.main(
        ["--model_name", str(tmp_path / "bert"), "--dump_checkpoint", str(out), "--num_layers", "3"]
        + ["--layer_selection", "angular", "--calibration_file", str(tmp_path / "cal.pickle")]
    )
    report = json.loads((tmp_path / "d.layer_selection.json").read_text())
    assert report["method"] == "angular" and len(report["teacher_layers"]) == 3 and len(report["scores"]) == 4


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--calibration_file not found"),
        ("corrupt", "--calibration_file: binarized data file .* is empty, truncated or corrupt"),
        ("outside_vocab", "--calibration_file: .* outside the vocabulary of size 200"),
        ("empty", "--calibration_file: .*cal.pickle holds no tokens"),
        ("unknown_format", "--calibration_file: unknown binarized data format for .*cal.txt"),
        ("no_file", "--layer_selection block_influence needs --calibration_file"),
        ("zero_sequences", "--calibration_sequences must be >= 1, got 0"),
        ("file_with_even", "--calibration_file is only read by --layer_selection angular or block_influence"),
        ("original_without_a_list", "--layer_selection original: the original has no list for 2 of 4 blocks"),
    ],
)
def test_bad_calibration_input_is_a_one_line_error(tmp_path, llama_teacher, case, message):
    calibration = tmp_path / "cal.pickle"
    save_sequences(_sequences(high=250 if case == "outside_vocab" else 200), calibration)
    if case == "empty":
        save_sequences([np.zeros(0, np.uint16)], calibration)
    if case == "corrupt":
        calibration.write_bytes(b"\x80\x04not a pickle")
    if case == "unknown_format":
        calibration = tmp_path / "cal.txt"
        calibration.write_text("w4 w5 w6")
    flags = {
        "missing": ["--layer_selection", "angular", "--calibration_file", str(tmp_path / "nope.pickle")],
        "no_file": ["--layer_selection", "block_influence"],
        "zero_sequences": ["--layer_selection", "angular", "--calibration_file", str(calibration)]
        + ["--calibration_sequences", "0"],
        "file_with_even": ["--layer_selection", "even", "--calibration_file", str(calibration)],
        "original_without_a_list": ["--layer_selection", "original"],
    }.get(case, ["--layer_selection", "block_influence", "--calibration_file", str(calibration)])
    with pytest.raises(UserError, match=message) as err:
        extract.main(_argv(llama_teacher, tmp_path / "s.pth", "--num_layers", "2", *flags))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.pth").exists() and not (tmp_path / "s.layer_selection.json").exists()
