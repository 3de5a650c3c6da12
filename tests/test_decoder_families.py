"""Llama-style decoder families end to end: extract a student, train it with DIITO through the CLI.

Interventions, restarts and shared embeddings per family are in test_interventions.py,
extraction details in test_extraction.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tr
from conftest import DECODER_FAMILIES, save_tiny_decoder_teacher

import causal_train
from architectures import ARCHITECTURES, check_student_teacher
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from scripts import extract
from token_store import save_sequences
from utils import UserError

VOCAB = 200
BOS, EOS = 1, 2  # the word-level test tokenizer's <s> and </s>


def _corpus(path: Path, family: str, n: int = 24) -> Path:
    """Random sequences framed as binarization frames them for `family` (no start token for Qwen)."""
    rng = np.random.default_rng(0)
    start = [BOS] if ARCHITECTURES[family].start_token is not None else []
    seqs = [np.array(start + rng.integers(4, VOCAB, rng.integers(12, 30)).tolist() + [EOS]) for _ in range(n)]
    save_sequences(seqs, path)
    return path


def _mapping(path: Path) -> Path:
    # Teacher blocks 3 and 1 (all 4 slices of 8) <-> student blocks 1 and 0.
    path.write_text(
        json.dumps(
            {
                "interchange_variable_mappings": [
                    {
                        "teacher_variable_names": ["$L:3$H:[0:4]$[0:8]"],
                        "student_variable_names": ["$L:1$H:[0:4]$[0:8]"],
                    },
                    {
                        "teacher_variable_names": ["$L:1$H:[0:4]$[0:8]"],
                        "student_variable_names": ["$L:0$H:[0:4]$[0:8]"],
                    },
                ]
            }
        )
    )
    return path


def _train_args(tmp_path: Path, family: str, teacher: Path, student: Path, *extra: str) -> list[str]:
    return [
        "--force",
        "--n_gpu",
        "0",
        "--log_interval",
        "1",
        "--checkpoint_interval",
        "10",
        "--student_type",
        family,
        "--student_config",
        str(student / "config.json"),
        "--student_pretrained_weights",
        str(tmp_path / "student.pth"),
        "--teacher_type",
        family,
        "--teacher_name",
        str(teacher),
        "--neuron_mapping",
        str(_mapping(tmp_path / "m.nm")),
        "--alpha_ce",
        "0.5",
        "--alpha_clm",
        "0.5",
        "--alpha_cos",
        "0.1",
        "--alpha_causal_ce",
        "0.5",
        "--interchange_prop",
        "0.3",
        "--dump_path",
        str(tmp_path / "results"),
        "--run_name",
        "run",
        "--data_file",
        str(_corpus(tmp_path / f"corpus.{family}.pickle", family)),
        "--seed",
        "0",
        "--n_epoch",
        "1",
        "--batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        "2",
        *extra,
    ]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_cli_extracts_and_trains_a_decoder_student_with_causal_ce(tmp_path, family):
    teacher = save_tiny_decoder_teacher(family, tmp_path / "teacher", vocab=VOCAB)
    extract.main(
        [
            "--model_type",
            family,
            "--model_name",
            str(teacher),
            "--num_layers",
            "2",
            "--dump_checkpoint",
            str(tmp_path / "student.pth"),
            "--dump_folder",
            str(tmp_path / "student"),
        ]
    )
    dump = causal_train.main(_train_args(tmp_path, family, teacher, tmp_path / "student"))

    trained = tr.AutoModelForCausalLM.from_pretrained(dump).state_dict()
    init = torch.load(tmp_path / "student.pth", weights_only=True)
    changed = [k for k in init if not torch.equal(trained[k], init[k])]
    assert "model.layers.1.mlp.down_proj.weight" in changed
    assert all(torch.isfinite(v).all() for v in trained.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(dump / "log" / "train"))
    events.Reload()
    losses = {
        tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("losses/")
    }
    for tag in ("losses/loss_ce", "losses/loss_clm", "losses/loss_cos", "losses/loss_causal_ce"):
        assert tag in losses and all(np.isfinite(losses[tag])), tag
    assert max(losses["losses/loss_causal_ce"]) > 0


def test_qwen_corpus_is_framed_by_its_end_token_only():
    # Qwen's tokenizers define no start token: chunks of a long sequence end with EOS and start bare.
    special = dict(eos_token=EOS, pad_token=3)
    seq = np.array(list(range(4, 44)) + [EOS])  # 41 tokens
    dataset = LmSeqsDataset(DatasetParams(16, False, special, family="qwen2"), [seq])
    assert dataset.params.start_id is None
    chunks = [dataset.sequence(i) for i in range(len(dataset))]
    assert [len(c) for c in chunks] == [16, 16]  # 15 body tokens + EOS each; the 11-token tail is dropped
    assert chunks[0].tolist() == list(range(4, 19)) + [EOS] and chunks[1].tolist() == list(range(19, 34)) + [EOS]
    with pytest.raises(UserError, match=f"does not end with id {EOS}"):
        LmSeqsDataset(DatasetParams(64, False, special, family="qwen2"), [seq[:-1]])


def test_llama_corpus_keeps_bos_and_eos_framing():
    special = dict(bos_token=BOS, eos_token=EOS, unk_token=0)
    seq = np.array([BOS] + list(range(4, 44)) + [EOS])
    dataset = LmSeqsDataset(DatasetParams(16, False, special, family="llama"), [seq])
    assert all(dataset.sequence(i)[0] == BOS and dataset.sequence(i)[-1] == EOS for i in range(len(dataset)))
    assert dataset.params.pad_id == 0


@pytest.mark.parametrize(
    "student, teacher, mlm, message",
    [
        ("llama", "qwen2", False, "a llama student cannot be distilled from a qwen2 teacher"),
        ("qwen2", "bert", False, "causal LM .* needs a gpt2/llama/mistral/qwen2/qwen3/gemma student"),
        ("gemma", "gemma", True, "--mlm needs a distilbert/roberta student and a bert/roberta teacher"),
    ],
)
def test_table_refuses_pairs_it_does_not_allow(student, teacher, mlm, message):
    with pytest.raises(UserError, match=message):
        check_student_teacher(student, teacher, mlm)


def test_qwen_students_take_either_qwen_teacher_and_the_cli_lists_the_families():
    check_student_teacher("qwen2", "qwen3", False)
    check_student_teacher("qwen3", "qwen2", False)
    parser = causal_train.build_parser()
    choices = {a.dest: a.choices for a in parser._actions if a.dest in ("student_type", "teacher_type")}
    assert choices["student_type"] == ["distilbert", "roberta", "gpt2", *DECODER_FAMILIES]
    assert choices["teacher_type"] == ["bert", "roberta", "gpt2", *DECODER_FAMILIES]


def test_freeze_pos_embs_is_refused_for_rotary_students(tmp_path):
    teacher = save_tiny_decoder_teacher("llama", tmp_path / "teacher", vocab=VOCAB)
    extract.main(
        [
            "--model_type",
            "llama",
            "--model_name",
            str(teacher),
            "--num_layers",
            "2",
            "--dump_checkpoint",
            str(tmp_path / "student.pth"),
        ]
    )
    (tmp_path / "student").mkdir()
    tr.AutoConfig.from_pretrained(teacher).to_json_file(str(tmp_path / "student" / "config.json"))
    with pytest.raises(UserError, match="--freeze_pos_embs does not apply to a llama student .*rotary"):
        causal_train.main(_train_args(tmp_path, "llama", teacher, tmp_path / "student", "--freeze_pos_embs"))
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("fast", [False, True], ids=["line_by_line", "fast_process"])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_binarization_frames_each_line_with_the_tokens_the_training_set_expects(tmp_path, family, fast):
    from conftest import save_word_level_tokenizer

    from scripts import binarized_data
    from token_store import load_sequences

    # A tokenizer-only folder: beside a tiny model's config, AutoTokenizer would pick the family's own
    # (BPE) tokenizer class over the word-level test tokenizer.
    start = [BOS] if ARCHITECTURES[family].start_token is not None else []
    special = save_word_level_tokenizer(tmp_path / "tokenizer", VOCAB, with_bos=bool(start))
    text = tmp_path / "corpus.txt"
    text.write_text("w5 w6 w7\nw8 w9\n")
    out = binarized_data.main(
        [
            "--file_path",
            str(text),
            "--tokenizer_type",
            family,
            "--tokenizer_name",
            str(tmp_path / "tokenizer"),
            "--dump_file",
            str(tmp_path / "data" / "bin"),
            *(["--fast_process"] if fast else []),
        ]
    )
    params = DatasetParams(64, False, special, family=family)
    got = sorted(seq.tolist() for seq in load_sequences(out))
    assert got == sorted([start + [5, 6, 7, EOS], start + [8, 9, EOS]])
    assert (params.start_id is None) == (not start)
