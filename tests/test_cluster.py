"""Cluster readiness of training: precision and TF32, launch checks, host-device synchronisations,
run-folder outputs (tokenizer, checkpoint-<step>/ folders, train_results.json, console line), the
original's extra flags, and the faithfulness fixes (crossway reuse, partial windows, fp16 widths,
CLM interchange accuracy)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import json
import logging
import math
import sys
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, load_state, tensorboard_scalars, tiny_distiller
from transformers import AutoModelForMaskedLM, AutoTokenizer

import causal_train
import losses
import model_loading
from diito_runs import ModelRuns
from neuron_mapping import load_neuron_mapping
from step_plan import Mode, Pairing, Side, StepDraws, build_plan
from training_config import RunContext
from utils import UserError

H = "$H:[0:4]$[0:8]"


def _distiller(tmp_path, arch="bert", **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "m.nm"
    path.write_text(
        json.dumps(
            {
                "interchange_variable_mappings": [
                    {"teacher_variable_names": [f"$L:1{H}"], "student_variable_names": [f"$L:0{H}"]}
                ]
            }
        )
    )
    return tiny_distiller(tmp_path, arch, load_neuron_mapping(path), **settings)


def _batch(d, rows=range(4)):
    return d.dataset.batch_sequences([d.dataset[i] for i in rows])


def _args(*extra):
    required = [
        "--dump_path",
        "x",
        "--data_file",
        "x",
        "--student_type",
        "distilbert",
        "--student_config",
        "x",
        "--teacher_type",
        "bert",
        "--teacher_name",
        "x",
        "--n_gpu",
        "0",
    ]
    return causal_train.parse_args(required + list(extra))


def _options(*extra):
    return _args(*extra)[1]


# --- precision ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, device, dtype",
    [
        ([], "cuda", None),
        (["--teacher_fp16", "--bf16"], "cuda", torch.bfloat16),
        (["--teacher_fp16", "--bf16"], "cpu", torch.bfloat16),
        (["--teacher_fp16", "--fp16"], "cuda", torch.float16),
        (["--teacher_fp16", "--fp16"], "cpu", torch.float16),
        (["--teacher_fp16"], "cuda", torch.float16),
        (["--teacher_fp16"], "cpu", torch.bfloat16),
    ],
)
def test_teacher_dtype_follows_the_mixed_precision_dtype(flags, device, dtype):
    assert model_loading.teacher_dtype(*_args(*flags), torch.device(device)) == dtype


@pytest.mark.parametrize("flags", [["--fp16"], ["--bf16"], []], ids=["fp16", "bf16", "no-amp"])
def test_teacher_fp16_trains_under_every_precision_on_cpu(small_run_argv, flags):
    dump = causal_train.main(
        small_run_argv("--teacher_fp16", "--gradient_accumulation_steps", "1", "--max_steps", "2", *flags)
    )
    values = tensorboard_scalars(dump, "losses/loss")
    assert len(values) == 2 and all(math.isfinite(v) for v in values.values())


def test_tf32_flag_sets_the_backend_state():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        causal_train.set_precision_backends(_options("--tf32"))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        causal_train.set_precision_backends(_options())  # the default: exact float32
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


# --- launch -------------------------------------------------------------------------------------------


def test_srun_without_a_launcher_is_refused_with_the_torchrun_command(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(UserError, match=r"SLURM started 4 tasks .*srun --ntasks-per-node 1 torchrun"):
        causal_train.init_distributed(_options())
    causal_train.refuse_bare_slurm_tasks({"SLURM_NTASKS": "4", "WORLD_SIZE": "4"})  # torchrun under srun
    causal_train.refuse_bare_slurm_tasks({"SLURM_NTASKS": "1"})
    causal_train.refuse_bare_slurm_tasks({})


def test_ddp_timeout_reaches_init_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    context = causal_train.init_distributed(_options("--ddp_timeout", "42"))
    assert context.world_size == 2
    assert calls == [{"backend": "gloo", "timeout": timedelta(seconds=42)}]
    assert _options().ddp_timeout == 1800
    with pytest.raises(UserError, match="--ddp_timeout must be >= 1"):
        causal_train.cluster_checks(_options("--ddp_timeout", "0"))


def test_a_pickle_corpus_in_a_multi_process_run_warns_once_on_rank_0(caplog):
    with caplog.at_level(logging.WARNING):
        assert causal_train.warn_pickle_in_multi_process("c.train.pickle", RunContext(world_size=2))
        assert not causal_train.warn_pickle_in_multi_process("c.train.tokens.npy", RunContext(world_size=2))
        assert not causal_train.warn_pickle_in_multi_process("c.train.pickle", RunContext(world_size=1))
        assert causal_train.warn_pickle_in_multi_process("c.train.pickle", RunContext(global_rank=1, world_size=2))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        len(warnings) == 1 and "each of the 2 processes unpickles" in warnings[0] and "--format memmap" in warnings[0]
    )


# --- host-device synchronisations ----------------------------------------------------------------------


def _count_syncs(monkeypatch, d, micro_batches: int) -> dict[str, int]:
    """Tensor -> Python conversions in this project's code, and all-reduces, while `micro_batches`
    micro-batches train (Hugging Face's own mask checks are not counted).

    The run pretends to be multi-process (all-reduces counted, not sent); the host group is a sentinel.
    """
    counts = {"conversions": 0, "device_all_reduce": 0, "host_all_reduce": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(REPO)) and "/tests/" not in caller:  # this project's code, not the library's
                counts["conversions"] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def all_reduce(tensor, op=None, group=None):
        counts["host_all_reduce" if group == "host" else "device_all_reduce"] += 1

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    d.distributed = d.stop.distributed = d.window.distributed = True
    d.stop.host_group = "host"
    d.student_runs.no_sync = contextlib.nullcontext
    batch = _batch(d)
    for _ in range(micro_batches):
        d._train_micro_batch(batch)
    monkeypatch.undo()
    return counts


def test_synchronisations_are_per_window_not_per_micro_batch(monkeypatch, tmp_path):
    settings = dict(log_interval=1000, checkpoint_interval=1000, max_steps=100)
    counts = {}
    for accum in (4, 8):
        d = _distiller(tmp_path / str(accum), gradient_accumulation_steps=accum, **settings)
        d.window.batches_per_epoch = 100  # one window, whatever the tiny corpus holds
        d.student.train()
        counts[accum] = _count_syncs(monkeypatch, d, accum)
        assert d.state.n_optim_steps == 1 and math.isfinite(d.state.last_loss["loss"])
    # One device all-reduce per window (non-finite flags); stop signals ride a host group per micro-batch.
    assert counts[4]["device_all_reduce"] == counts[8]["device_all_reduce"] == 1
    assert (counts[4]["host_all_reduce"], counts[8]["host_all_reduce"]) == (4, 8)
    # Per micro-batch only the masker's two counts (base and dual: 4), and two reads of host tensors
    # (the token count, the agreed stop flag) remain (before: 14, and a device all-reduce); the window
    # adds one read of the flags and metrics, and the gradient norm.
    per_micro_batch = (counts[8]["conversions"] - counts[4]["conversions"]) / 4
    assert per_micro_batch == 6, counts
    assert counts[4]["conversions"] - 4 * per_micro_batch == 2, counts


# --- run folder, flags of the original ------------------------------------------------------------------


def test_run_folder_has_tokenizer_checkpoint_folders_results_and_console_lines(
    monkeypatch, small_run_argv, caplog, tmp_path
):
    logged, finished = [], []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: types.SimpleNamespace(
        log=lambda d, step: logged.append((step, d)), finish=lambda: finished.append(kw)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        with caplog.at_level(logging.INFO):
            dump = causal_train.main(
                small_run_argv(
                    "--save_total_limit",
                    "2",
                    "--log_interval",
                    "2",
                    "--tf32",
                    "--is_wandb",
                    "--interchange_mlm",
                    "--cache_dir",
                    str(tmp_path / "cache"),
                )
            )
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    assert json.loads((dump / "parameters.json").read_text())["tf32"] is True
    tokenizer = AutoTokenizer.from_pretrained(dump)
    assert tokenizer.mask_token_id == 103
    # 6 micro-batches, a checkpoint every 2: the newest 2 folders are kept, each a from_pretrained model.
    assert sorted(p.name for p in dump.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    model = AutoModelForMaskedLM.from_pretrained(dump / "checkpoint-4")
    saved = load_state(dump / "checkpoints" / "state_0000000004_rank0.pth")["student"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(dump / "checkpoint-4").vocab == tokenizer.vocab

    results = json.loads((dump / "train_results.json").read_text())
    assert (results["optimizer_steps"], results["micro_batches"], results["skipped_steps"]) == (3, 6, 0)
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "loss_causal_ce"):
        assert results[f"train_{key}"] == pytest.approx(tensorboard_scalars(dump, f"losses/{key}")[6]), key
    assert results["train_tokens"] > 0 and results["train_tokens_per_second"] > 0 and results["train_runtime"] > 0

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3 and lines[-1].startswith("step 3/3 | micro-batch 6 | loss ")
    assert "causal_ce" in lines[-1] and "tokens/s" in lines[-1]
    assert [step for step, _ in logged] == [2, 4, 6] and logged[-1][1]["losses/loss"] == pytest.approx(
        results["train_loss"]
    )
    assert len(finished) == 1 and finished[0]["name"] == "run"
    assert any("--interchange_mlm has no effect" in r.getMessage() for r in caplog.records)


def test_is_wandb_without_the_package_is_refused(monkeypatch, small_run_argv):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--is_wandb: the wandb package is not installed"):
        causal_train.main(small_run_argv("--is_wandb"))


def test_cache_dir_reaches_the_teacher_and_tokenizer_loading(monkeypatch, tiny_bert_teacher, tmp_path):
    seen = []
    for cls in (model_loading.AutoTokenizer, model_loading.ARCHITECTURES["bert"].lm_cls()):
        original = cls.from_pretrained

        def recording(name, *a, _original=original, **kw):
            seen.append(kw.get("cache_dir"))
            return _original(name, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    options = dataclasses.replace(_options("--cache_dir", str(tmp_path / "cache")), teacher_name=str(tiny_bert_teacher))
    model_loading.load_teacher(options)
    assert seen == [str(tmp_path / "cache")] * 2


# --- faithfulness ---------------------------------------------------------------------------------------


def test_crossway_sub_step_reuses_the_corruption_and_mirrors_the_positions(tmp_path):
    d = _distiller(tmp_path, include_crossway=True)
    plan = d._plan(_batch(d))
    draws = d.generator.get_state()
    back = d._mirrored_plan(plan)
    assert torch.equal(d.generator.get_state(), draws)  # no new corruption or positions drawn
    assert torch.equal(back.input_ids, plan.dual_ids) and torch.equal(back.dual_ids, plan.input_ids)
    assert torch.equal(back.interchange_mask, plan.dual_interchange_mask)
    assert torch.equal(back.dual_interchange_mask, plan.interchange_mask)
    assert torch.equal(back.attention_mask, plan.dual_attention_mask)
    assert torch.equal(back.dual_attention_mask, plan.attention_mask)
    # The dual's MLM targets are the swapped sub-step's labels.
    dual_labels = plan.draws.pairing.dual.labels
    assert torch.equal(back.labels, dual_labels[back.select])
    assert (dual_labels != -100).any()


# --- step plans, built without a distiller ---------------------------------------------------------------


def _side(lengths, width, first_id, mlm=True):
    """A Side of rows 0..bs-1 with ids first_id + position, real up to `lengths`; MLM: position 1 a target."""
    lengths = torch.tensor(lengths)
    ids = first_id + torch.arange(width).repeat(len(lengths), 1)
    real = torch.arange(width)[None] < lengths[:, None]
    labels = torch.full_like(ids, losses.IGNORE_INDEX)
    if mlm:
        labels[:, 1] = ids[:, 1]
    else:
        labels = ids.masked_fill(~real, losses.IGNORE_INDEX)
    return Side(ids.masked_fill(~real, 0), labels, lengths)


def _pairing(base, dual, variables=(["t"], ["s"]), source_rows=None):
    """Positions 2 of every base row paired with position 3 of the dual's."""
    imask, dmask = torch.zeros_like(base.ids, dtype=torch.bool), torch.zeros_like(dual.ids, dtype=torch.bool)
    imask[:, 2], dmask[:, 3] = True, True
    return Pairing(dual, imask, dmask, variables, source_rows)


PLAN_FLAGS = dict(mlm=True, restrict_ce_to_mask=False, need_hidden=True)
COUNTERFACTUAL_FIELDS = (
    "interchange_mask",
    "dual_interchange_mask",
    "teacher_variables",
    "student_variables",
    "dual_ids",
    "dual_attention_mask",
    "source_rows",
    "swapped_ids",
)


def test_a_plain_plan_carries_no_counterfactual_fields():
    base = _side([6, 4], 6, 10)
    plan = build_plan(StepDraws(base), mode=Mode.PLAIN, **PLAN_FLAGS)
    assert all(getattr(plan, name) is None for name in COUNTERFACTUAL_FIELDS)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert torch.equal(plan.select, real) and torch.equal(plan.hidden_rows, real)
    assert torch.equal(plan.attention_mask, real.long())
    # Logits on every real token; the MLM loss reads the rows of the targets (position 1 of each row).
    assert torch.equal(plan.labels[plan.lm_rows], torch.tensor([11, 11]))
    with pytest.raises(AssertionError):
        build_plan(StepDraws(base, _pairing(base, _side([5, 5], 5, 50))), mode=Mode.PLAIN, **PLAN_FLAGS)


def test_a_clm_plan_labels_each_real_position_with_its_next_token_and_has_no_attention_mask():
    plan = build_plan(StepDraws(_side([4], 5, 10, mlm=False)), mode=Mode.PLAIN, **{**PLAN_FLAGS, "mlm": False})
    assert plan.attention_mask is None and plan.lm_rows is None
    assert plan.labels.tolist() == [11, 12, 13, losses.IGNORE_INDEX]


def test_an_interchange_plan_pairs_the_drawn_positions_with_the_dual_and_its_variables():
    base, dual = _side([6, 4], 6, 10), _side([5, 3], 5, 50)
    draws = StepDraws(base, _pairing(base, dual, variables=(["$L:1$H:0"], ["$L:0$H:0"])))
    plan = build_plan(draws, mode=Mode.INTERCHANGE, **PLAN_FLAGS)
    assert plan.input_ids[plan.interchange_mask].tolist() == [12, 12]
    assert plan.dual_ids[plan.dual_interchange_mask].tolist() == [53, 0]  # row 1's dual is shorter: padding
    assert plan.dual_attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert (plan.teacher_variables, plan.student_variables) == (["$L:1$H:0"], ["$L:0$H:0"])
    assert plan.swapped_ids is None and plan.source_rows is None
    fast_draws = StepDraws(base, _pairing(base, dual, source_rows=torch.tensor([1, 0])))
    fast = build_plan(fast_draws, mode=Mode.FAST_INTERCHANGE, **PLAN_FLAGS)
    assert fast.source_rows.tolist() == [1, 0] and fast.dual_ids is None and fast.dual_attention_mask is None


def test_a_token_swap_plan_swaps_the_dual_tokens_in_and_its_mirror_swaps_the_roles():
    base, dual = _side([6, 6], 6, 10), _side([5, 5], 5, 50)
    draws = StepDraws(base, _pairing(base, dual, variables=None))
    plan = build_plan(draws, mode=Mode.TOKEN_SWAP, **PLAN_FLAGS)
    assert plan.swapped_ids[:, 2].tolist() == [53, 53] and torch.equal(plan.swapped_ids[:, 3:], base.ids[:, 3:])
    assert plan.teacher_variables is None and plan.dual_ids is None
    back = build_plan(draws.mirrored(None), mode=Mode.TOKEN_SWAP, **PLAN_FLAGS)
    assert torch.equal(back.input_ids, dual.ids) and back.swapped_ids[:, 3].tolist() == [12, 12]
    assert torch.equal(back.interchange_mask, plan.dual_interchange_mask)
    assert torch.equal(back.labels, dual.labels[back.select])


def test_a_partial_window_at_an_epochs_end_is_divided_by_its_own_size(tmp_path, monkeypatch):
    d = _distiller(tmp_path, gradient_accumulation_steps=3)
    d.window.batches_per_epoch = 13
    sizes = []
    for i in range(13):
        d.state.batch_in_epoch = i
        sizes.append(d.window.size(d.state))
    assert sizes == [3] * 12 + [1]
    scaled = []
    monkeypatch.setattr(d.scaler, "scale", lambda loss: scaled.append(loss) or loss)
    for position, divisor in ((12, 1), (4, 3)):
        d.state.batch_in_epoch = position
        metrics, _ = d._forward_backward(_batch(d), sync=True)
        assert float(scaled[-1]) == pytest.approx(float(metrics["loss"]) / divisor)


def test_fp16_pads_batch_widths_to_a_multiple_of_8(tmp_path):
    d = _distiller(tmp_path, fp16=True)
    batch = _batch(d)
    assert batch[0].size(1) % 8 != 0
    plan = d._plan(batch)
    width = plan.input_ids.size(1)
    assert width % 8 == 0 and plan.dual_ids.size(1) % 8 == 0 and width - batch[0].size(1) < 8
    assert not plan.attention_mask[:, batch[0].size(1) :].any()  # padding only
    plain = _distiller(tmp_path / "plain")._plan(batch)
    assert torch.equal(plain.select, plan.select[:, : batch[0].size(1)])


def test_clm_interchange_accuracy_counts_every_real_position_the_last_one_included(tmp_path):
    d = _distiller(tmp_path, "gpt2")
    agree, differ = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    s = ModelRuns(None, None, cf_logits=torch.cat([agree, agree, agree]))
    t = ModelRuns(None, None, cf_logits=torch.cat([differ, differ, agree]))
    labels = torch.tensor([5, 6, losses.IGNORE_INDEX])  # the last real token has no next token
    assert float(d._interchange_accuracy(s, t, labels)) == pytest.approx(1 / 3)
    d.mlm = True  # MLM: only the masked positions (rows with a label)
    assert float(d._interchange_accuracy(s, t, labels)) == 0.0
