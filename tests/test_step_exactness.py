"""The lean DIITO step computes the same losses and gradients as the straightforward one.

The straightforward step (written out here) runs every pass in full -- base, source and
counterfactual runs through whole models, logits on every position -- and masks afterwards. The
distiller's step skips work: sources stop after the deepest intervened block, a deterministic
model's counterfactual run restarts from its base run above the intervention, the LM head sees only
the rows a loss reads. Randomness is off (eval mode, or dropout 0) so both see the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tr
from conftest import STEP_DIM, STEP_HEADS, STEP_VOCAB, tiny_distiller

import losses
from architectures import backbone, get_architecture, num_layers
from causal_distiller import CausalDistiller
from interventions import (
    activations_from_cache,
    get_activation_at,
    interchange_with_activation_at,
    record_block_inputs,
    run_blocks_above,
)
from masking import real_token_mask, sample_interchange_masks, sample_source_rows
from neuron_mapping import (
    deserialize_variable_name,
    load_neuron_mapping,
    parse_variable_name,
    sample_interchange_variables,
)

VOCAB, DIM, HEADS = STEP_VOCAB, STEP_DIM, STEP_HEADS


def _distiller(
    tmp_path: Path, arch: str, mapping: list, dropout: float = 0.0, student_mode: str = "train", **settings
) -> CausalDistiller:
    """tiny_distiller with `mapping` [(teacher names, student names)] read as a .nm file."""
    mapping_path = tmp_path / "m.nm"
    mapping_path.write_text(
        json.dumps(
            {
                "interchange_variable_mappings": [
                    {"teacher_variable_names": t, "student_variable_names": s} for t, s in mapping
                ]
            }
        )
    )
    distiller = tiny_distiller(tmp_path, arch, load_neuron_mapping(mapping_path), dropout=dropout, **settings)
    distiller.student.train(student_mode == "train")
    return distiller


def _batch(arch: str) -> tuple[torch.Tensor, ...]:
    """Base rows of lengths 12, 9, 12, 7 and duals of 10, 12, 8, 12, padded to 12 tokens."""
    g = torch.Generator().manual_seed(5)
    start, end, pad = (101, 102, 0) if arch == "bert" else (0, 0, 0)

    def rows(lengths):
        ids = torch.randint(104, VOCAB, (4, 12), generator=g)
        ids[:, 0] = start
        ids[torch.arange(4), lengths - 1] = end
        return ids.masked_fill(~real_token_mask(lengths, 12), pad)

    lengths, dual_lengths = torch.tensor([12, 9, 12, 7]), torch.tensor([10, 12, 8, 12])
    return rows(lengths), lengths, rows(dual_lengths), dual_lengths


def _reference_loss(d: CausalDistiller, batch) -> torch.Tensor:
    """The straightforward step: three full passes per model, full logits, losses on masked positions.

    Draws its randomness in the distiller's order from the distiller's generators.
    """
    p, T = d.config, d.temperature
    token_ids, lengths, dual_ids, dual_lengths = batch
    n = token_ids.size(1)
    attn = real_token_mask(lengths, n)
    input_ids, labels = d._prepare(token_ids, lengths)
    if p.fast_mode:
        rows = sample_source_rows(len(lengths), d.generator)
        dual_input_ids, dual_lengths = input_ids[rows], lengths[rows]
    else:
        dual_input_ids, _ = d._prepare(dual_ids, dual_lengths)
    t_vars, s_vars = sample_interchange_variables(d.mapping, d.mapping_rng)
    imask, dmask = sample_interchange_masks(
        lengths,
        dual_lengths,
        n,
        dual_input_ids.size(1),
        prop=p.interchange_prop,
        max_token=p.interchange_max_token,
        consecutive=p.interchange_consecutive_only,
        masked_tokens=(labels != -100) if p.interchange_masked_token_only else None,
        generator=d.generator,
    )
    mask = attn.long() if d.mlm else None
    dual_mask = real_token_mask(dual_lengths, dual_input_ids.size(1)).long() if d.mlm else None

    def three_runs(model, names):
        extra = get_architecture(model).forward_kwargs
        base = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra)
        if p.data_augment:
            swapped = input_ids.clone()
            swapped[imask] = dual_input_ids[dmask]
            counterfactual = model(input_ids=swapped, attention_mask=mask, output_hidden_states=True, **extra)
        else:
            source = get_activation_at(model, dual_input_ids, dual_mask, names)
            counterfactual = interchange_with_activation_at(model, input_ids, mask, source, names, imask, dmask)
        return base, counterfactual

    with torch.no_grad():
        t, t_cf = three_runs(d.teacher, t_vars)
    s, s_cf = three_runs(d.student, s_vars)
    vocab = s.logits.size(-1)
    select = (labels != -100) if (d.mlm and p.restrict_ce_to_mask) else attn

    def kl(s_logits, t_logits):
        return (
            nn.KLDivLoss(reduction="batchmean")(
                F.log_softmax(s_logits[select] / T, -1), F.softmax(t_logits[select] / T, -1)
            )
            * T**2
        )

    def cos(s_hidden, t_hidden):
        return nn.CosineEmbeddingLoss()(s_hidden[attn], t_hidden[attn], torch.ones(int(attn.sum())))

    if d.mlm:
        lm = F.cross_entropy(s.logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    else:
        lm = F.cross_entropy(s.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    mse = F.mse_loss(s.logits[select], t.logits[select], reduction="sum") / int(select.sum())
    return (
        0.25 * kl(s.logits, t.logits)
        + 0.25 * lm
        + 0.1 * mse
        + 0.25 * cos(s.hidden_states[-1], t.hidden_states[-1])
        + 0.25 * kl(s_cf.logits, t_cf.logits)
        + 0.25 * cos(s_cf.hidden_states[-1], t_cf.hidden_states[-1])
    )


def _loss_and_grads(d: CausalDistiller, batch, reference: bool):
    d.student.zero_grad(set_to_none=True)
    loss = _reference_loss(d, batch) if reference else d._loss_step(batch)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in d.student.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_step_equals_reference(d: CausalDistiller, batch) -> None:
    rng_state, mapping_state = d.generator.get_state(), d.mapping_rng.getstate()
    loss, grads = _loss_and_grads(d, batch, reference=False)
    d.generator.set_state(rng_state)
    d.mapping_rng.setstate(mapping_state)
    expected, expected_grads = _loss_and_grads(d, batch, reference=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


H = f"H:[0:{HEADS}]$[0:{DIM // HEADS}]"
MAPPINGS = {
    "middle": [([f"$L:1${H}"], [f"$L:0${H}"])],
    "last blocks": [([f"$L:3${H}"], [f"$L:1${H}"])],
    "several layers, partial heads": [(["$L:[1:3]$H:[1:3]$[2:6]"], ["$L:[0:2]$H:0$[0:8]"])],
}


# ------------------------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("student_mode", ["eval", "train", "train, recomputed"])
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_exact_step_equals_the_straightforward_step(tmp_path, mapping, student_mode):
    # eval, and train without dropout: the student restarts its counterfactual run above the
    # intervention. "recomputed": the path a student with dropout takes (every block runs again),
    # forced here at dropout 0 so that it can be compared with the reference.
    mode = student_mode.split(",")[0]
    d = _distiller(tmp_path, "bert", MAPPINGS[mapping], interchange_consecutive_only=True, student_mode=mode)
    d.student_runs.has_dropout = student_mode.endswith("recomputed")
    assert_step_equals_reference(d, _batch("bert"))


@pytest.mark.parametrize(
    "settings",
    [
        dict(interchange_masked_token_only=True, restrict_ce_to_mask=True),
        {},  # random positions
        dict(data_augment=True),
        dict(interchange_consecutive_only=True, interchange_max_token=2),
    ],
)
def test_exact_step_equals_the_straightforward_step_in_every_position_mode(tmp_path, settings):
    d = _distiller(tmp_path, "bert", MAPPINGS["middle"], **settings)
    assert_step_equals_reference(d, _batch("bert"))


@pytest.mark.parametrize("mapping", ["middle", "last blocks"])
def test_exact_step_equals_the_straightforward_step_for_gpt2(tmp_path, mapping):
    d = _distiller(tmp_path, "gpt2", MAPPINGS[mapping], interchange_consecutive_only=True, student_mode="eval")
    assert_step_equals_reference(d, _batch("gpt2"))


# -------------------------------------------------------------------------------------------- fast mode


@pytest.mark.parametrize("student_mode", ["eval", "train"])
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_fast_mode_equals_full_runs_on_duals_drawn_from_the_batch(tmp_path, mapping, student_mode):
    # Without dropout, reading sources from the base run and sharing its prefix changes no number.
    d = _distiller(
        tmp_path,
        "bert",
        MAPPINGS[mapping],
        fast_mode=True,
        interchange_consecutive_only=True,
        student_mode=student_mode,
    )
    assert_step_equals_reference(d, _batch("bert"))


def test_fast_mode_with_dropout_trains_every_student_parameter(tmp_path):
    d = _distiller(tmp_path, "bert", MAPPINGS["middle"], fast_mode=True, dropout=0.1)
    loss, metrics = d._loss_step(_batch("bert"))
    loss.backward()
    assert torch.isfinite(loss) and "loss_causal_ce" in metrics
    missing = [n for n, p in d.student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_source_rows_are_a_permutation_with_no_row_its_own_source():
    g = torch.Generator().manual_seed(0)
    for bs in (2, 3, 8, 33):
        rows = sample_source_rows(bs, g)
        assert sorted(rows.tolist()) == list(range(bs))
        assert not (rows == torch.arange(bs)).any()
    assert sample_source_rows(1, g).tolist() == [0]


# ------------------------------------------------------------------------------------ what each step runs


def _count_block_calls(model: nn.Module) -> tuple[list[int], list]:
    counts = [0] * num_layers(model)
    handles = []
    for i, block in enumerate(backbone(model).get_submodule(get_architecture(model).blocks)):
        handles.append(block.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)))
    return counts, handles


def test_a_student_without_dropout_restarts_its_counterfactual_run(tmp_path):
    # Teacher block 1 <-> student block 0, a training student with dropout 0.
    d = _distiller(tmp_path, "bert", MAPPINGS["middle"])
    assert d.student.training and not d.student_runs.draws_dropout_masks
    t_counts, t_handles = _count_block_calls(d.teacher)
    s_counts, s_handles = _count_block_calls(d.student)
    d._loss_step(_batch("bert"))
    for h in t_handles + s_handles:
        h.remove()
    # Both: base; source up to the intervened block; counterfactual above it.
    assert t_counts == [2, 2, 2, 2] and s_counts == [2, 2]


@pytest.mark.parametrize("fast", [False, True])
def test_each_block_runs_only_where_the_step_needs_it(tmp_path, fast):
    # Teacher block 1 <-> student block 0, students trained with dropout.
    d = _distiller(tmp_path, "bert", MAPPINGS["middle"], fast_mode=fast, dropout=0.1)
    t_counts, t_handles = _count_block_calls(d.teacher)
    s_counts, s_handles = _count_block_calls(d.student)
    d._loss_step(_batch("bert"))
    for h in t_handles + s_handles:
        h.remove()
    if fast:
        # Base runs everywhere; counterfactual runs above the intervened block; no source runs.
        assert t_counts == [1, 1, 2, 2] and s_counts == [1, 2]
    else:
        # Teacher: base; source up to block 1; counterfactual above it. Student: base, source up to
        # block 0, and a full counterfactual run (its dropout masks differ from the base run's).
        assert t_counts == [2, 2, 2, 2] and s_counts == [3, 2]


# ------------------------------------------------------------------------------- --gradient_checkpointing


@pytest.mark.parametrize(
    "arch, dropout, settings",
    [
        ("bert", 0.1, {}),  # a student with dropout: every counterfactual block recomputed, masks replayed
        ("bert", 0.0, {}),  # no dropout: the counterfactual run restarts above the intervention
        ("bert", 0.1, dict(fast_mode=True)),
        ("bert", 0.1, dict(data_augment=True)),
        ("bert", 0.1, dict(alpha_causal_ce=0.0, alpha_causal_cos=0.0)),  # plain distillation
        ("gpt2", 0.1, {}),
    ],
    ids=["dropout", "restart", "fast_mode", "data_augment", "plain", "gpt2"],
)
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tmp_path, arch, dropout, settings):
    """Each student block recomputed in backward (hooks outside the recomputed part): the step's loss and
    every gradient equal the stored-activations step bit for bit, dropout masks included."""
    results = []
    for recompute in (False, True):
        (tmp_path / str(recompute)).mkdir()
        d = _distiller(
            tmp_path / str(recompute),
            arch,
            MAPPINGS["middle"],
            dropout=dropout,
            gradient_checkpointing=recompute,
            **settings,
        )
        torch.manual_seed(7)  # the dropout masks
        counts, handles = _count_block_calls(d.student)
        inner = [0]  # calls of a module inside block 0: its forward runs again when recomputed
        first = next(backbone(d.student).get_submodule(get_architecture(d.student).blocks)[0].children())
        handles.append(first.register_forward_hook(lambda *_, inner=inner: inner.__setitem__(0, inner[0] + 1)))
        loss, grads = _loss_and_grads(d, _batch(arch), reference=False)
        for h in handles:
            h.remove()
        results.append((loss, grads, counts))
        assert inner[0] == counts[0] * (2 if recompute else 1), (recompute, inner, counts)
    (loss, grads, counts), (ckpt_loss, ckpt_grads, ckpt_counts) = results
    assert torch.equal(loss, ckpt_loss)
    assert grads.keys() == ckpt_grads.keys() and len(grads) == len(list(d.student.parameters()))
    different = [name for name in grads if not torch.equal(grads[name], ckpt_grads[name])]
    assert not different, different
    assert counts == ckpt_counts  # the hooks ran in the forward only: never again in the recomputation


@pytest.mark.parametrize("fast", [False, True])
def test_the_vocabulary_projection_sees_only_selected_rows(tmp_path, fast):
    d = _distiller(tmp_path, "bert", MAPPINGS["middle"], restrict_ce_to_mask=True, fast_mode=fast)
    rows = {"teacher": [], "student": []}
    handles = [
        d.teacher.cls.predictions.decoder.register_forward_hook(lambda m, a, o: rows["teacher"].append(a[0].shape[0])),
        d.student.vocab_projector.register_forward_hook(lambda m, a, o: rows["student"].append(a[0].shape[0])),
    ]
    rng_state = d.generator.get_state()
    d._loss_step(_batch("bert"))
    for h in handles:
        h.remove()
    d.generator.set_state(rng_state)
    token_ids, lengths = _batch("bert")[:2]
    _, labels = d._prepare(token_ids, lengths)
    n_targets = int((labels != -100).sum())
    # Base and counterfactual runs, MLM targets only: no padding, no source run, nothing twice.
    assert rows == {"teacher": [n_targets] * 2, "student": [n_targets] * 2}


# ---------------------------------------------------------------------------------------- interventions


def _three_block_model(arch: str) -> nn.Module:
    """A 3-block model of hidden size 32 (4 heads of 8), vocabulary 120, in eval mode."""
    torch.manual_seed(0)
    size = dict(vocab_size=120, max_position_embeddings=64)
    if arch == "gpt2":
        return tr.GPT2LMHeadModel(
            tr.GPT2Config(
                vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        ).eval()
    if arch == "distilbert":
        return tr.DistilBertForMaskedLM(
            tr.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **size)
        ).eval()
    config_class, model_class = {
        "bert": (tr.BertConfig, tr.BertForMaskedLM),
        "roberta": (tr.RobertaConfig, tr.RobertaForMaskedLM),
    }[arch]
    extra = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2) if arch == "roberta" else {}
    return model_class(
        config_class(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **size, **extra)
    ).eval()


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "gpt2"])
@pytest.mark.parametrize(
    "names",
    [
        deserialize_variable_name("$L:1$H:[1:3]$[2:8]") + deserialize_variable_name("$L:2$H:0$[0:8]"),
        deserialize_variable_name("$L:2$H:[0:4]$[0:8]"),  # the last block: restart from its recorded output
    ],
)
def test_run_blocks_above_equals_the_full_intervention(arch, names):
    model = _three_block_model(arch)
    g = torch.Generator().manual_seed(1)
    base, dual = torch.randint(3, 120, (2, 9), generator=g), torch.randint(3, 120, (2, 7), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -2:] = 0
    base_sel = torch.zeros(2, 9, dtype=torch.bool)
    base_sel[0, [1, 4, 6]], base_sel[1, [0, 5]] = True, True
    dual_sel = torch.zeros(2, 7, dtype=torch.bool)
    dual_sel[0, [0, 2, 5]], dual_sel[1, [3, 6]] = True, True
    lowest = min(parse_variable_name(n)[0] for n in names)
    extra = get_architecture(model).forward_kwargs
    with torch.no_grad():
        with record_block_inputs(model, [lowest + 1]) as cache:
            model(input_ids=base, attention_mask=mask, **extra)
        values = get_activation_at(model, dual, None, names)
        full = interchange_with_activation_at(model, base, mask, values, names, base_sel, dual_sel)
        above = run_blocks_above(model, cache, lowest, values, names, base_sel, dual_sel)
    torch.testing.assert_close(above.logits, full.logits)
    for k in range(lowest + 1, num_layers(model) + 1):
        torch.testing.assert_close(above.hidden_states[k], full.hidden_states[k])
    assert all(h is None for h in above.hidden_states[: lowest + 1])


def test_activations_from_cache_equal_get_activation_at_on_the_chosen_rows():
    model = _three_block_model("gpt2")
    ids = torch.randint(3, 120, (3, 8), generator=torch.Generator().manual_seed(2))
    names = deserialize_variable_name("$L:0$H:1$[2:6]") + deserialize_variable_name("$L:2$H:[0:2]$[0:8]")
    rows = torch.tensor([2, 0, 1])
    with torch.no_grad():
        with record_block_inputs(model, [1, 3]) as cache:
            model(input_ids=ids, use_cache=False)
        cached = activations_from_cache(model, cache, names, rows=rows)
        direct = get_activation_at(model, ids[rows], None, names)
    for a, b in zip(cached, direct, strict=False):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("chunk_elements", [None, 100, 1])  # one chunk; 2 rows per chunk (last one short); 1 row
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_loss_value_and_gradient_equal_autograd_through_kl_div(temperature, chunk_elements, monkeypatch):
    if chunk_elements is not None:
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(6, 50, generator=g)).requires_grad_()
    t = 3 * torch.randn(6, 50, generator=g)
    expected = (
        nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1))
        * temperature**2
    )
    (expected_grad,) = torch.autograd.grad(expected, s)
    loss = losses.ce_loss(s, t, temperature)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert losses.ce_loss(s[:0], t[:0], temperature) == 0
