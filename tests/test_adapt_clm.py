"""scripts/adapt_clm.py: the loss is the model's own next-token cross-entropy, the held-out report a direct
computation, the saved folder a loadable model, and bad inputs one-line errors that leave folders alone."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_decoder_teacher
from transformers import LlamaForCausalLM

from scripts import adapt_clm
from token_store import save_sequences
from utils import UserError

BOS, EOS, PAD = 1, 2, 3


def _corpus(path, n: int, seed: int) -> str:
    """`n` framed sequences (BOS ... EOS) of 12 to 20 tokens (the dataset drops shorter ones)."""
    rng = np.random.default_rng(seed)
    seqs = [np.array([BOS, *rng.integers(4, 200, rng.integers(10, 19)), EOS], dtype=np.uint16) for _ in range(n)]
    save_sequences(seqs, path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    teacher = save_tiny_decoder_teacher("llama", root / "teacher")
    return root, teacher, _corpus(root / "train.pickle", 40, 0), _corpus(root / "heldout.pickle", 12, 1)


def _argv(setup, out, *extra) -> list[str]:
    _, teacher, train, heldout = setup
    return [
        "--model_name",
        str(teacher),
        "--data_file",
        train,
        "--heldout_file",
        heldout,
        "--output_dir",
        str(out),
        "--steps",
        "3",
        "--batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def test_step_loss_is_the_models_own_next_token_cross_entropy_over_real_tokens(setup):
    _, teacher, _, _ = setup
    model = LlamaForCausalLM.from_pretrained(teacher)
    ids = torch.tensor([[BOS, 10, 11, 12, EOS], [BOS, 20, EOS, PAD, PAD]])
    lengths = torch.tensor([5, 3])
    ours = adapt_clm.clm_step_loss(model, ids, lengths)
    # One sequence at a time, unpadded: every position predicts the next token.
    logits = [model(input_ids=ids[i : i + 1, :n]).logits[0, :-1] for i, n in enumerate(lengths.tolist())]
    targets = [ids[i, 1:n] for i, n in enumerate(lengths.tolist())]
    assert ours.item() == pytest.approx(F.cross_entropy(torch.cat(logits), torch.cat(targets)).item(), rel=1e-5)


def test_adapting_lowers_the_training_loss_and_saves_a_loadable_model_with_its_report(setup, tmp_path):
    out = tmp_path / "adapted"
    results = adapt_clm.main(_argv(setup, out, "--steps", "8"))
    assert len(results["train_losses"]) == 8 and results["train_losses"][-1] < results["train_losses"][0]
    report = json.loads((out / adapt_clm.RESULTS_FILE).read_text())
    assert report["heldout"] == pytest.approx(results["heldout"]) and report["args"]["steps"] == 8
    model = LlamaForCausalLM.from_pretrained(out).eval()
    # The held-out report is the loaded model's mean next-token NLL over the held-out sequences, one at a time.
    from token_store import load_sequences

    nll, n = 0.0, 0
    with torch.no_grad():
        for seq in load_sequences(setup[3]):
            ids = torch.from_numpy(np.asarray(seq, dtype=np.int64))[None]
            nll += F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += ids.size(1) - 1
    assert report["heldout"]["n_predictions"] == n
    assert report["heldout"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".adapted.*"))
    # The modes a plain mkdir/open gives, not mkdtemp's 0700 and safetensors' 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


def test_a_second_run_replaces_only_with_overwrite_and_keeps_the_old_model_when_saving_fails(
    setup, tmp_path, monkeypatch
):
    out = tmp_path / "adapted"
    adapt_clm.main(_argv(setup, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already holds an adapted model: pass --overwrite_output_dir"):
        adapt_clm.main(_argv(setup, out))

    def full_disk(self, folder, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", full_disk)
    with pytest.raises(UserError, match="cannot save the adapted model in .*No space left on device"):
        adapt_clm.main(_argv(setup, out, "--overwrite_output_dir", "--seed", "7"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapted"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
        (["--warmup_prop", "1"], "--warmup_prop must be in"),
        (["--seed", "-1"], "--seed must be in"),
        (["--batch_size", "1000"], "fewer than --batch_size 1000"),
    ],
)
def test_bad_flags_are_one_line_errors(setup, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        adapt_clm.main(_argv(setup, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_refuses_an_encoder_and_a_folder_it_did_not_write(setup, tmp_path, tiny_bert_teacher):
    argv = _argv(setup, tmp_path / "out")
    argv[argv.index("--model_name") + 1] = str(tiny_bert_teacher)
    with pytest.raises(UserError, match="is a bert model, not a causal LM"):
        adapt_clm.main(argv)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty and holds no clm_adaptation.json"):
        adapt_clm.main(_argv(setup, mine, "--overwrite_output_dir"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
