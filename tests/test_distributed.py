"""Distributed and mixed-precision training on CPU.

Two processes through `torchrun --standalone --nproc_per_node 2` (gloo): disjoint, reshuffled,
length-grouped shards; identical pairing, variables and weights on both ranks; rank 0 alone
writes the run folder; a SIGTERM to one rank stops both at the same micro-batch, and `--resume`
ends bitwise equal to the uninterrupted run. Then `--fp16` / `--bf16` steps on CPU.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import BERT_SPECIAL_IDS, resume_argv, train_argv
from conftest import load_state as load
from conftest import tensorboard_scalars as scalars
from launch import TORCHRUN, finish, launch, processes, wait_for
from torch.utils.data import DistributedSampler

import causal_train
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import DatasetParams, LmSeqsDataset

# 50 sequences, 2 ranks, batch 4: 7 micro-batches per rank and epoch; accumulation 2.
FLAGS = ("--n_epoch", "2", "--max_steps", "-1", "--gradient_accumulation_steps", "2", "--checkpoint_interval", "4")


def records(folder: Path, rank: int) -> dict:
    lines = [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]
    batches: dict[int, list[list[int]]] = {}
    for line in lines:
        if "batch" in line:
            batches.setdefault(line["epoch"], []).append(line["batch"])
    return dict(
        dual_index=[line["dual_index"] for line in lines if "dual_index" in line],
        torch_seed=[line["torch_seed"] for line in lines if "torch_seed" in line],
        batches=batches,
        variables=[line["variables"] for line in lines if "variables" in line],
        student=torch.load(folder / f"student_rank{rank}.pt", weights_only=True),
    )


def test_torchrun_two_processes_shard_the_data_agree_on_everything_and_resume_exactly(
    small_corpus, tmp_path, tiny_bert_teacher, tiny_student_config, tiny_mapping
):
    def args(folder: str, *extra: str) -> list[str]:
        return train_argv(
            tmp_path / folder,
            tiny_bert_teacher,
            tiny_student_config,
            tiny_mapping,
            *FLAGS,
            *extra,
            data_file=small_corpus,
        )

    rec = tmp_path / "record"
    rec.mkdir()
    marker, log = tmp_path / "paused", {name: tmp_path / f"{name}.log" for name in ("whole", "cut", "resumed")}
    with processes() as started:
        whole = launch(started, args("whole"), log["whole"], TORCHRUN, record=rec)
        # Only rank 1 gets the signal; rank 0 must stop with it at the same micro-batch.
        cut = launch(started, args("cut"), log["cut"], TORCHRUN, pause_after=4, pause_rank=1, marker=marker)
        wait_for(marker, cut, log["cut"])
        os.kill(int(marker.read_text()), signal.SIGTERM)
        assert finish(cut, log["cut"]) != 0  # torchrun reports its workers' status 143 as a failure
        assert re.search(r"exitcode\s*:\s*143", log["cut"].read_text())
        # Both ranks saved micro-batch 5, mid-window, each with its own gradients (no all-reduce yet).
        cut_states = tmp_path / "cut" / "results" / "run" / "checkpoints"
        names = [f"state_0000000005_rank{r}.pth" for r in (0, 1)]
        assert sorted(p.name for p in cut_states.iterdir()) == names
        grads = [load(cut_states / name)["grads"] for name in names]
        pairs = [(a, b) for a, b in zip(*grads, strict=False) if a is not None]  # frozen position embeddings have none
        assert pairs and any(not torch.equal(a, b) for a, b in pairs)
        resumed = launch(started, resume_argv(args("cut")), log["resumed"], TORCHRUN)
        assert finish(resumed, log["resumed"]) == 0, log["resumed"].read_text()[-3000:]
        assert finish(whole, log["whole"]) == 0, log["whole"].read_text()[-3000:]

    # One dump, written by rank 0; each rank writes only its own state file.
    assert [p.name for p in (tmp_path / "whole" / "results").iterdir()] == ["run"]
    run = tmp_path / "whole" / "results" / "run"
    for name in (
        "parameters.json",
        "git_log.json",
        "config.json",
        "checkpoint.pth",
        "model_epoch_0.pth",
        "model_epoch_1.pth",
        "pytorch_model.bin",
        "model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert len(list((run / "log" / "train").iterdir())) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "state_0000000012_rank0.pth",
        "state_0000000012_rank1.pth",
    ]
    state0, state1 = (load(run / "checkpoints" / f"state_0000000012_rank{r}.pth") for r in (0, 1))
    assert "student" in state0 and "optimizer" in state0 and "student" not in state1 and "optimizer" not in state1
    assert state0["rng"]["mapping"] == state1["rng"]["mapping"]  # the per-step variable draw
    assert not torch.equal(state0["rng"]["generator"], state1["rng"]["generator"])  # masking, per rank
    # Only rank 0 reports progress (torchrun --tee prefixes each worker's lines with [default<rank>]).
    rank1_lines = [line for line in log["whole"].read_text().splitlines() if line.startswith("[default1]")]
    assert not [line for line in rank1_lines if "INFO" in line or "epoch" in line], rank1_lines[:5]

    # Every epoch: disjoint halves covering the corpus, reshuffled, batched as the grouped sampler does.
    seen = [records(rec, r) for r in (0, 1)]
    corpus = pickle.loads(small_corpus.read_bytes())
    dataset = LmSeqsDataset(DatasetParams(512, True, BERT_SPECIAL_IDS, seed=42), corpus)
    groups = create_lengths_groups(dataset.lengths)
    halves = {(e, r): {i for b in seen[r]["batches"][e] for i in b} for e in (0, 1) for r in (0, 1)}
    for epoch in (0, 1):
        assert not halves[epoch, 0] & halves[epoch, 1]
        assert halves[epoch, 0] | halves[epoch, 1] == set(range(len(dataset)))
        for rank in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=42)
            sampler.set_epoch(epoch)
            assert seen[rank]["batches"][epoch] == list(GroupedBatchSampler(sampler, groups, 4))
    assert halves[0, 0] != halves[1, 0]
    # Same dual pairing, same variables at every step, same final weights on both ranks.
    assert seen[0]["dual_index"] == seen[1]["dual_index"] == [dataset.dual_index.tolist()]
    assert seen[0]["variables"] == seen[1]["variables"] and len(seen[0]["variables"]) == 14
    # Each rank draws its own dropout masks: the global torch RNG is seeded with seed + rank.
    assert [seen[0]["torch_seed"], seen[1]["torch_seed"]] == [[42], [43]]
    final = torch.load(run / "pytorch_model.bin", weights_only=True)
    for name, value in final.items():
        assert torch.equal(seen[0]["student"][name], value) and torch.equal(seen[1]["student"][name], value), name

    # The stopped and resumed run ends where the whole run did, bit for bit.
    assert "Resumed from" in log["resumed"].read_text()
    resumed_final = torch.load(tmp_path / "cut" / "results" / "run" / "pytorch_model.bin", weights_only=True)
    different = [k for k in final if not torch.equal(final[k], resumed_final[k])]
    assert not different, different


@pytest.mark.parametrize("flags", [["--fp16"], ["--bf16", "--teacher_fp16"]], ids=["fp16", "bf16"])
def test_mixed_precision_trains_on_cpu_with_finite_losses(small_run_argv, flags):
    # Two optimizer steps of one micro-batch each (float16 matmuls are slow on CPU).
    dump = causal_train.main(small_run_argv("--gradient_accumulation_steps", "1", "--max_steps", "2", *flags))
    losses = scalars(dump, "losses/loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values())
    state = torch.load(dump / "pytorch_model.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    saved = load(dump / "checkpoints" / "state_0000000002_rank0.pth")
    assert bool(saved["scaler"]) == ("--fp16" in flags)  # GradScaler state only with fp16
