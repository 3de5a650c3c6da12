"""The README's extraction and training commands, end to end on the real data; training-loop invariants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

import causal_train
from conftest import train_argv
from scripts import extract_distilbert
from utils import UserError


@pytest.fixture
def extracted(tmp_path, tiny_bert_teacher) -> Path:
    out = tmp_path / "distillation_checkpoints" / "tiny_num_layer_2.pth"
    extract_distilbert.main([
        "--model_type", "bert", "--model_name", str(tiny_bert_teacher), "--dump_checkpoint", str(out),
        "--num_layers", "2", "--vocab_transform",
    ])
    return out


def test_extraction_copies_the_chosen_teacher_layers(extracted, tiny_bert_teacher):
    state = torch.load(extracted, weights_only=True)
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_bert_teacher).state_dict()
    # A 4-layer teacher spreads a 2-layer student over its first and last blocks.
    assert torch.equal(state["distilbert.transformer.layer.1.attention.q_lin.weight"],
                       teacher["bert.encoder.layer.3.attention.self.query.weight"])
    assert torch.equal(state["distilbert.transformer.layer.0.ffn.lin1.bias"],
                       teacher["bert.encoder.layer.0.intermediate.dense.bias"])
    assert torch.equal(state["vocab_transform.weight"], teacher["cls.predictions.transform.dense.weight"])


def test_readme_commands_train_a_student_that_loads_with_from_pretrained(
    shared_data, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, extracted
):
    dump = causal_train.main(train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping,
                                        weights=extracted))
    assert dump == tmp_path / "results" / "run"
    for name in ("parameters.json", "git_log.json", "config.json", "pytorch_model.bin", "checkpoint.pth",
                 "model.safetensors"):
        assert (dump / name).is_file(), name
    params = json.loads((dump / "parameters.json").read_text())
    assert params["alpha_causal_ce"] == 0.25 and params["interchange_consecutive_only"] is True
    assert set(json.loads((dump / "git_log.json").read_text())) >= {"repo_id", "repo_sha", "repo_branch"}
    student = AutoModelForMaskedLM.from_pretrained(dump)
    saved = torch.load(dump / "pytorch_model.bin", weights_only=True)
    for k, v in student.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # Frozen position embeddings did not move from the extracted weights.
    init = torch.load(extracted, weights_only=True)
    assert torch.equal(saved["distilbert.embeddings.position_embeddings.weight"],
                       init["distilbert.embeddings.position_embeddings.weight"])
    assert not torch.equal(saved["distilbert.transformer.layer.0.ffn.lin1.weight"],
                           init["distilbert.transformer.layer.0.ffn.lin1.weight"])
    tags = _tensorboard_tags(dump)
    for tag in ("losses/loss", "losses/loss_ce", "losses/loss_mlm", "losses/loss_cos", "losses/loss_causal_ce",
                "metrics/interchange_accuracy", "learning_rate/lr", "global/memory_usage", "global/speed",
                "losses/cum_avg_loss_epoch", "parameter_mean/distilbert.embeddings.word_embeddings.weight"):
        assert tag in tags, tag


def _tensorboard_tags(dump: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(dump / "log" / "train"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--parallel_crossway"], "parallel_crossway"),
        (["--alpha_clm", "0.5"], "alpha_clm"),
        (["--alpha_ce", "-1"], "alpha_ce"),
        (["--teacher_type", "gpt2"], "bert/roberta teacher"),
        (["--token_counts", "/nonexistent/counts.pickle"], "token counts file not found"),
        (["--neuron_mapping", "/nonexistent/map.nm"], "neuron mapping not found"),
        (["--interchange_masked_token_only"], "choose one of"),
    ],
)
def test_inconsistent_flags_are_refused_before_training(tmp_path, tiny_bert_teacher, tiny_student_config,
                                                         tiny_mapping, flags, message):
    with pytest.raises(UserError, match=message):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping, *flags))
    assert not (tmp_path / "results").exists()


def test_force_refuses_to_delete_a_folder_that_is_not_a_dump(shared_data, tmp_path, tiny_bert_teacher,
                                                              tiny_student_config, tiny_mapping):
    precious = tmp_path / "results" / "run"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("months of work")
    with pytest.raises(UserError, match="not a run's dump"):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping))
    assert (precious / "thesis.tex").read_text() == "months of work"


def test_student_teacher_vocab_mismatch_is_refused(shared_data, tmp_path, tiny_bert_teacher, tiny_mapping):
    config = tmp_path / "small_vocab.json"
    config.write_text(json.dumps(dict(dim=32, n_heads=4, hidden_dim=64, n_layers=2, vocab_size=1000)))
    with pytest.raises(UserError, match="vocab size 1000"):
        causal_train.main(train_argv(tmp_path, tiny_bert_teacher, config, tiny_mapping))


def test_every_training_flag_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flags = {s for action in causal_train.build_parser()._actions for s in action.option_strings if s.startswith("--")}
    missing = sorted(f for f in flags - {"--help"} if f"`{f}`" not in readme and f"{f} " not in readme)
    assert not missing, f"flags missing from README.md: {missing}"
