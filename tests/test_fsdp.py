"""`--fsdp` on CPU: two gloo processes through torchrun, compared with DDP runs of the same flags.

A BERT teacher with a DistilBERT student (dropout: every counterfactual run recomputes all blocks)
and a Llama teacher with a Llama student (no dropout: the counterfactual run restarts above the
intervened block, calling sharded blocks directly), DIITO's causal losses on. The losses of every
logged micro-batch equal DDP's; a run stopped by SIGTERM and resumed ends bitwise equal to the
uninterrupted FSDP run; the final student folder loads with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers as tr
from conftest import load_state as load
from conftest import resume_argv, save_tiny_decoder_teacher, tiny_decoder_config, train_argv
from conftest import tensorboard_scalars as scalars
from launch import TORCHRUN, finish, launch, processes, wait_for
from test_decoder_families import _train_args as decoder_argv

import causal_train
import model_loading
import sharding
from architectures import ARCHITECTURES
from diito_runs import DiitoRuns
from masking import real_token_mask
from scripts import extract
from step_plan import Mode, Side, StepDraws, build_plan
from training_config import TrainingConfig
from utils import UserError

# 50 sequences, 2 ranks, batch 4: 7 micro-batches per rank and epoch; accumulation 2 (as test_distributed).
BERT_FLAGS = ("--n_epoch", "2", "--max_steps", "-1", "--gradient_accumulation_steps", "2", "--checkpoint_interval", "4")
# 24 sequences, 2 ranks, batch 4: 3 micro-batches per rank; accumulation 1.
LLAMA_FLAGS = ("--max_steps", "3", "--checkpoint_interval", "3")
LOSSES = ("losses/loss", "losses/loss_ce", "losses/loss_causal_ce", "losses/loss_cos")


def run_all(runs: dict[str, tuple[list[str], dict]], tmp_path: Path) -> dict[str, Path]:
    """Launch each named (argv, hooks) under torchrun at once; wait for all; return their logs."""
    logs = {name: tmp_path / f"{name}.log" for name in runs}
    with processes() as started:
        procs = {name: launch(started, argv, logs[name], TORCHRUN, **hooks) for name, (argv, hooks) in runs.items()}
        for name, proc in procs.items():
            assert finish(proc, logs[name]) == 0, logs[name].read_text()[-3000:]
    return logs


def assert_same_losses(run: Path, reference: Path, rtol: float) -> None:
    for tag in LOSSES:
        got, want = scalars(run, tag), scalars(reference, tag)
        assert want and got.keys() == want.keys(), tag
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=rtol, abs=1e-6), (tag, step)


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory, small_corpus, tiny_bert_teacher, tiny_student_config, tiny_mapping) -> Path:
    """Under tmp: ddp/ and fsdp/ whole runs, and cut/: an FSDP run stopped by SIGTERM at micro-batch 5
    (mid-window) and resumed."""
    tmp = tmp_path_factory.mktemp("bert_fsdp")

    def argv(folder: str, *extra: str) -> list[str]:
        return train_argv(
            tmp / folder,
            tiny_bert_teacher,
            tiny_student_config,
            tiny_mapping,
            *BERT_FLAGS,
            *extra,
            data_file=small_corpus,
        )

    marker, logs = tmp / "paused", {name: tmp / f"{name}.log" for name in ("ddp", "fsdp", "cut", "resumed")}
    with processes() as started:
        procs = {
            "ddp": launch(started, argv("ddp"), logs["ddp"], TORCHRUN),
            # Rank 1 reads no weights: it builds both models empty and takes rank 0's.
            "fsdp": launch(started, argv("fsdp", "--fsdp"), logs["fsdp"], TORCHRUN, weightless_rank=1),
        }
        cut = launch(started, argv("cut", "--fsdp"), logs["cut"], TORCHRUN, pause_after=4, pause_rank=1, marker=marker)
        wait_for(marker, cut, logs["cut"])
        os.kill(int(marker.read_text()), signal.SIGTERM)
        assert finish(cut, logs["cut"]) != 0
        assert re.search(r"exitcode\s*:\s*143", logs["cut"].read_text()), logs["cut"].read_text()[-3000:]
        states = tmp / "cut" / "results" / "run" / "checkpoints"
        assert sorted(p.name for p in states.iterdir()) == [f"state_0000000005_rank{r}.pth" for r in (0, 1)]
        resumed = launch(started, resume_argv(argv("cut", "--fsdp")), logs["resumed"], TORCHRUN)
        assert finish(resumed, logs["resumed"]) == 0, logs["resumed"].read_text()[-3000:]
        for name, proc in procs.items():
            assert finish(proc, logs[name]) == 0, logs[name].read_text()[-3000:]
    return tmp


def test_fsdp_losses_equal_ddp_losses_for_a_bert_teacher_and_distilbert_student(bert_runs):
    run = bert_runs / "fsdp" / "results" / "run"
    assert_same_losses(run, bert_runs / "ddp" / "results" / "run", rtol=1e-4)
    assert len(scalars(run, "losses/loss")) == 14
    final, ddp_final = (
        torch.load(bert_runs / k / "results/run/pytorch_model.bin", weights_only=True) for k in ("fsdp", "ddp")
    )
    assert final.keys() == ddp_final.keys()
    assert all(torch.allclose(final[k], ddp_final[k], rtol=1e-3, atol=1e-5) for k in final)


def test_fsdp_resume_after_sigterm_ends_bitwise_equal_to_the_uninterrupted_run(bert_runs):
    cut_state = load(bert_runs / "cut" / "results" / "run" / "checkpoints" / "state_0000000012_rank0.pth")
    whole_state = load(bert_runs / "fsdp" / "results" / "run" / "checkpoints" / "state_0000000012_rank0.pth")
    # The state holds full tensors (gathered on rank 0), keyed as a plain student's.
    assert (
        cut_state["student"].keys()
        == tr.DistilBertForMaskedLM(tr.DistilBertConfig.from_pretrained(bert_runs / "fsdp" / "results" / "run"))
        .state_dict()
        .keys()
    )
    final, resumed = (
        torch.load(bert_runs / k / "results" / "run" / "pytorch_model.bin", weights_only=True) for k in ("fsdp", "cut")
    )
    different = [k for k in final if not torch.equal(final[k], resumed[k])]
    assert not different, different
    for name in cut_state["optimizer"]["state"]:
        for key, value in whole_state["optimizer"]["state"][name].items():
            assert torch.equal(cut_state["optimizer"]["state"][name][key], value), (name, key)
    for tag in LOSSES:  # the resumed run's micro-batches 6..14 (TensorBoard purges the cut run's 5)
        cut, whole = (scalars(bert_runs / k / "results" / "run", tag) for k in ("cut", "fsdp"))
        assert {k: v for k, v in whole.items() if k > 5} == {k: v for k, v in cut.items() if k > 5}, tag


def test_fsdp_final_student_folder_loads_with_from_pretrained(bert_runs):
    run = bert_runs / "fsdp" / "results" / "run"
    model = tr.AutoModelForMaskedLM.from_pretrained(run)
    saved = torch.load(run / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    checkpoint = tr.AutoModelForMaskedLM.from_pretrained(run / "checkpoint-12")
    assert all(torch.isfinite(v).all() for v in checkpoint.state_dict().values())


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 4-block Llama teacher and its 2-block extracted student (folder with student.pth)."""
    tmp = tmp_path_factory.mktemp("llama_fsdp")
    teacher = save_tiny_decoder_teacher("llama", tmp / "teacher", vocab=200)
    extract.main(
        ["--model_type", "llama", "--model_name", str(teacher), "--num_layers", "2"]
        + ["--dump_checkpoint", str(tmp / "student.pth"), "--dump_folder", str(tmp / "student")]
    )
    return teacher, tmp


@pytest.mark.parametrize("mode", [(), ("--fast_mode",)], ids=["exact", "fast_mode"])
def test_fsdp_losses_equal_ddp_losses_for_a_llama_teacher_and_student(llama, tmp_path, mode):
    teacher, files = llama

    def argv(name: str, *extra: str) -> list[str]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "student.pth").symlink_to(files / "student.pth")
        return decoder_argv(folder, "llama", teacher, files / "student", *LLAMA_FLAGS, *mode, *extra)

    runs = {"ddp": (argv("ddp"), {}), "fsdp": (argv("fsdp", "--fsdp"), {"weightless_rank": 1})}
    if not mode:  # bf16 mixed precision and the teacher's CPU offload, against the float32 run
        runs["bf16"] = (argv("bf16", "--fsdp", "--bf16", "--fsdp_offload_teacher"), {})
        runs["recompute"] = (argv("recompute", "--fsdp", "--gradient_checkpointing"), {})
    run_all(runs, tmp_path)
    assert_same_losses(tmp_path / "fsdp" / "results" / "run", tmp_path / "ddp" / "results" / "run", rtol=1e-4)
    assert max(scalars(tmp_path / "fsdp" / "results" / "run", "losses/loss_causal_ce").values()) > 0
    if not mode:
        assert_same_losses(tmp_path / "bf16" / "results" / "run", tmp_path / "ddp" / "results" / "run", rtol=5e-2)
        # Sharded blocks recomputed in backward: the same run bit for bit.
        assert_same_losses(tmp_path / "recompute" / "results" / "run", tmp_path / "fsdp" / "results" / "run", rtol=0)
        recomputed, stored = (
            torch.load(tmp_path / k / "results" / "run" / "pytorch_model.bin", weights_only=True)
            for k in ("recompute", "fsdp")
        )
        assert all(torch.equal(recomputed[k], stored[k]) for k in stored)
    model = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "results" / "run")
    saved = torch.load(tmp_path / "fsdp" / "results" / "run" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_fsdp_without_a_launcher_is_refused_with_the_torchrun_command(small_run_argv):
    with pytest.raises(UserError, match=r"^--fsdp shards the models over several processes: launch with `torchrun"):
        causal_train.main(small_run_argv("--fsdp"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(fsdp_offload_teacher=True), "--fsdp_offload_teacher needs --fsdp"),
        (dict(fsdp=True, fp16=True), "--fsdp does not support --fp16"),
    ],
    ids=["offload_without_fsdp", "fp16"],
)
def test_fsdp_flag_combinations_that_cannot_work_are_refused(flags, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}") as error:
        sharding.check_flags(TrainingConfig(**flags), world_size=2)
    assert "\n" not in str(error.value)


# --- rank 0 alone reads the weights ------------------------------------------------------------------


PLAIN_PLAN = dict(restrict_ce_to_mask=False, need_hidden=False)


def _reference_llama() -> tr.LlamaForCausalLM:
    """Rank 0's model: seeded, loaded as bfloat16 with eager attention (the empty rank builds float32
    with the default attention and must follow)."""
    torch.manual_seed(0)
    config = tiny_decoder_config("llama")
    config._attn_implementation = "eager"
    return tr.LlamaForCausalLM(config).to(torch.bfloat16)


def _rank0_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        calls = []

        def load(weights: bool, refuse: bool = False):
            calls.append(weights)
            if refuse:
                raise UserError("the teacher folder is broken")
            return (
                _reference_llama()
                if weights
                else model_loading.empty_model(ARCHITECTURES["llama"], tiny_decoder_config("llama"))
            )

        try:
            sharding.load_on_rank0(lambda weights: load(weights, refuse=True), True, rank == 0)
            refusal = None
        except UserError as e:
            refusal = str(e)
        refused_calls, calls[:] = list(calls), []
        model = sharding.load_on_rank0(load, True, rank == 0)
        empty = all(p.device.type == "meta" for p in model.parameters())
        runs = sharding.shard(DiitoRuns(model), bf16=False, frozen=True, device=torch.device("cpu"))
        reference = _reference_llama()
        params = {n: p.full_tensor() for n, p in runs.model.named_parameters()}
        result = {
            "refusal": refusal,
            "refused_calls": refused_calls,
            "calls": list(calls),
            "empty_before_shard": empty,
            "params_equal": all(torch.equal(params[n], p) for n, p in reference.named_parameters()),
            "dtypes": sorted({str(p.dtype) for p in params.values()}),
            "buffers_equal": all(torch.equal(b, dict(reference.named_buffers())[n]) for n, b in model.named_buffers()),
            "tied": runs.model.lm_head.weight is runs.model.model.embed_tokens.weight,
            "attention": runs.model.config._attn_implementation,
        }
        # A saved student that does not fit: every rank judges the same states and refuses them alike.
        weights = {**reference.state_dict(), "model.norm.weight": torch.ones(5, dtype=torch.bfloat16)}
        optimizer = torch.optim.AdamW(runs.model.parameters())
        try:
            sharding.load_full_state(runs.model, optimizer, weights, {"state": {}, "param_groups": []})
        except UserError as e:
            result["misfit"] = str(e)
        # A student recomputing its blocks in backward, sharded from an empty rank: block 0's inner
        # module runs twice per step (forward, and again in backward), and every weight gets a gradient.
        student = sharding.load_on_rank0(load, True, rank == 0)
        student_runs = sharding.shard(
            DiitoRuns(student, recompute_blocks=True), bf16=False, frozen=False, device=torch.device("cpu")
        )
        calls_inside = [0]
        inner = next(student_runs.model.model.layers[0].children())
        inner.register_forward_hook(lambda *_: calls_inside.__setitem__(0, calls_inside[0] + 1))
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(rank))
        lengths = torch.tensor([9, 6])
        labels = ids.masked_fill(~real_token_mask(lengths, 9), -100)
        plan = build_plan(StepDraws(Side(ids, labels, lengths)), mode=Mode.PLAIN, mlm=False, **PLAIN_PLAN)
        student_runs(plan, None).logits.float().square().mean().backward()
        result["inner_calls"] = calls_inside[0]
        result["all_grads"] = all(p.grad is not None for p in student_runs.model.parameters())
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_only_rank_0_reads_weights_and_the_empty_rank_takes_its_weights_dtypes_buffers_and_ties(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank0_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Rank 0's refusal is every rank's, and the other rank never builds its model then.
    assert rank0["refusal"] == rank1["refusal"] == "the teacher folder is broken"
    assert (rank0["refused_calls"], rank1["refused_calls"]) == ([True], [])
    assert (rank0["calls"], rank1["calls"]) == ([True], [False])
    assert (rank0["empty_before_shard"], rank1["empty_before_shard"]) == (False, True)
    assert rank0["misfit"] == rank1["misfit"]
    assert rank0["misfit"].startswith("--resume: the saved student or optimizer does not fit this run's")
    assert rank0["inner_calls"] == rank1["inner_calls"] == 2 and rank0["all_grads"] and rank1["all_grads"]
    for result in (rank0, rank1):
        assert result["params_equal"] and result["buffers_equal"] and result["tied"], result
        assert result["dtypes"] == ["torch.bfloat16"]
        assert result["attention"] == "eager"


def test_an_empty_model_holds_no_weights_but_its_buffers_and_ties():
    model = model_loading.empty_model(ARCHITECTURES["llama"], tiny_decoder_config("llama"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = dict(tr.LlamaForCausalLM(tiny_decoder_config("llama")).named_buffers())
    for name, buffer in model.named_buffers():  # rotary frequencies: computed from the config, not saved
        assert buffer.device.type == "cpu" and torch.equal(buffer, reference[name]), name
