"""Tests for interventions (reads, writes, restarts, shared embeddings) and the model helpers of architectures."""

from __future__ import annotations

import pytest
import torch
import transformers as tr
from conftest import DECODER_FAMILIES, DECODER_HEAD_DIM, tiny_decoder_config

from architectures import backbone, get_architecture, hidden_size, lm_head_logits, num_heads, num_layers
from interventions import (
    get_activation_at,
    interchange_with_activation_at,
    record_block_inputs,
    run_blocks_above,
    run_blocks_from,
    shared_token_embeddings,
)
from neuron_mapping import deserialize_variable_name, parse_variable_name, validate_neuron_mapping
from utils import UserError

VOCAB, DIM, LAYERS, HEADS, SEQ = 120, 32, 3, 4, 9
HEAD_DIM = DIM // HEADS


def _tiny_config(arch: str):
    if arch in DECODER_FAMILIES:  # grouped-query attention: 2 key/value heads for 4 query heads
        return tiny_decoder_config(arch, vocab=VOCAB, hidden=DIM, layers=LAYERS, heads=HEADS, kv_heads=2)
    if arch == "bert":
        return tr.BertConfig(
            vocab_size=VOCAB,
            hidden_size=DIM,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    if arch == "distilbert":
        return tr.DistilBertConfig(
            vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64, max_position_embeddings=64
        )
    if arch == "roberta":
        return tr.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=DIM,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
    return tr.GPT2Config(
        vocab_size=VOCAB, n_embd=DIM, n_layer=LAYERS, n_head=HEADS, n_positions=64, bos_token_id=0, eos_token_id=0
    )


MODEL_CLASSES = {
    "bert": tr.BertForMaskedLM,
    "distilbert": tr.DistilBertForMaskedLM,
    "roberta": tr.RobertaForMaskedLM,
    "gpt2": tr.GPT2LMHeadModel,
    "llama": tr.LlamaForCausalLM,
    "mistral": tr.MistralForCausalLM,
    "qwen2": tr.Qwen2ForCausalLM,
    "qwen3": tr.Qwen3ForCausalLM,
    "gemma": tr.GemmaForCausalLM,
}
ARCHS = list(MODEL_CLASSES)
CAUSAL = {"gpt2", *DECODER_FAMILIES}

# Written out here, independently of the `architectures` table.
BLOCKS = {
    "bert": lambda m: m.bert.encoder.layer,
    "distilbert": lambda m: m.distilbert.transformer.layer,
    "roberta": lambda m: m.roberta.encoder.layer,
    "gpt2": lambda m: m.transformer.h,
    **{family: (lambda m: m.model.layers) for family in DECODER_FAMILIES},
}
FINAL_NORM = {"gpt2": lambda m: m.transformer.ln_f, **{family: (lambda m: m.model.norm) for family in DECODER_FAMILIES}}
HEAD_MODULE = {
    "bert": lambda m: m.cls,
    "distilbert": lambda m: m.vocab_projector,
    "roberta": lambda m: m.lm_head,
    "gpt2": lambda m: m.lm_head,
    **{family: (lambda m: m.lm_head) for family in DECODER_FAMILIES},
}


def _fresh_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODEL_CLASSES[arch](_tiny_config(arch)).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {arch: _fresh_model(arch) for arch in ARCHS}


@pytest.fixture
def batch():
    """Base and dual token ids `(2, SEQ)` / `(2, SEQ - 2)`, base attention mask with padding in row 1."""
    g = torch.Generator().manual_seed(1)
    base = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    dual = torch.randint(3, VOCAB, (2, SEQ - 2), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    dual_mask = torch.ones(2, SEQ - 2, dtype=torch.long)
    return base, mask, dual, dual_mask


def _masks(rows_base: list[list[int]], rows_dual: list[list[int]], seq: int, dual_seq: int):
    base = torch.zeros(len(rows_base), seq, dtype=torch.bool)
    dual = torch.zeros(len(rows_dual), dual_seq, dtype=torch.bool)
    for r, positions in enumerate(rows_base):
        base[r, positions] = True
    for r, positions in enumerate(rows_dual):
        dual[r, positions] = True
    return base, dual


# Row 0: three positions, not aligned with the dual's; row 1: none.
ROWS_BASE, ROWS_DUAL = [[1, 4, 6], []], [[0, 2, 5], []]
NAMES = (
    deserialize_variable_name("$L:0$H:1$[2:6]")
    + deserialize_variable_name("$L:0$H:3$[0:8]")
    + deserialize_variable_name("$L:[1:3]$H:[2:4]$[0:8]")
)


def _block_outputs(arch, model, input_ids, attention_mask, overwrite=None):
    """Block outputs `[(bs, seq, dim)] * LAYERS` of a plain forward, optionally overwriting sites.

    overwrite: `{layer: [(row, position, start, stop, value (stop - start,)), ...]}`, applied with
    explicit loops (the independent reference for the vectorised intervention).
    """
    blocks, outputs, handles = BLOCKS[arch](model), [], []

    def make_hook(layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            for row, pos, start, stop, value in (overwrite or {}).get(layer, []):
                hidden[row, pos, start:stop] = value
            outputs.append(hidden)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return hook

    for layer, block in enumerate(blocks):
        handles.append(block.register_forward_hook(make_hook(layer)))
    try:
        out = (
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            if arch in CAUSAL
            else model(input_ids=input_ids, attention_mask=attention_mask)
        )
    finally:
        for h in handles:
            h.remove()
    return outputs, out.logits


# ----------------------------------------------------------------------------------- model parts (architectures)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_shape_helpers_read_each_config_style(models, arch):
    model = models[arch]
    assert (num_layers(model), num_heads(model), hidden_size(model)) == (LAYERS, HEADS, DIM)
    assert backbone(model) is getattr(model, get_architecture(model).backbone)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_head_logits_on_selected_rows_equals_model_logits(models, arch, batch):
    model, (base, mask, _, _) = models[arch], batch
    with torch.no_grad():
        out = model(input_ids=base, attention_mask=mask, output_hidden_states=True)
        rows = lm_head_logits(model, out.hidden_states[-1][mask.bool()])  # (n_real, vocab)
    torch.testing.assert_close(rows, out.logits[mask.bool()])


def test_unsupported_model_is_refused():
    class Other(torch.nn.Module):
        config = tr.PretrainedConfig()

    with pytest.raises(UserError, match="unsupported model Other"):
        get_architecture(Other())


def test_base_model_reads_activations_but_has_no_lm_head(models, batch):
    base_model = models["bert"].bert
    base, mask, _, _ = batch
    with torch.no_grad():
        (value,) = get_activation_at(base_model, base, mask, ["$L:1$H:0$[0:8]"])
        expected = base_model(input_ids=base, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(value, expected[..., 0:8])
    with pytest.raises(UserError, match="BertModel has no LM head"):
        lm_head_logits(base_model, expected)


# ----------------------------------------------------------------------------------------------- reads


@pytest.mark.parametrize("arch", ARCHS)
def test_get_activation_equals_slices_of_hidden_states(models, arch, batch):
    model, (base, mask, _, _) = models[arch], batch
    names = ["$L:0$H:1$[2:6]", "$L:1$H:3$[0:8]", "$L:0$H:0$[0:8]"]
    with torch.no_grad():
        values = get_activation_at(model, base, mask, names)
        hidden = model(input_ids=base, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(values[0], hidden[1][..., 1 * HEAD_DIM + 2 : 1 * HEAD_DIM + 6])
    torch.testing.assert_close(values[1], hidden[2][..., 3 * HEAD_DIM : 4 * HEAD_DIM])
    torch.testing.assert_close(values[2], hidden[1][..., 0:HEAD_DIM])


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_decoder_last_layer_site_is_before_final_norm(models, arch, batch):
    model, (base, _, _, _) = models[arch], batch
    with torch.no_grad():
        (value,) = get_activation_at(model, base, None, [f"$L:{LAYERS - 1}$H:0$[0:{HEAD_DIM}]"])
        outputs, _ = _block_outputs(arch, model, base, None)
        final = model(input_ids=base, output_hidden_states=True, use_cache=False).hidden_states[-1]
    torch.testing.assert_close(value, outputs[-1][..., 0:HEAD_DIM])
    torch.testing.assert_close(final, FINAL_NORM[arch](model)(outputs[-1]))
    assert not torch.allclose(final[..., 0:HEAD_DIM], value)


@pytest.mark.parametrize("arch", ARCHS)
def test_get_activation_runs_no_block_above_the_deepest_and_no_head(models, arch, batch):
    model, (base, mask, _, _) = models[arch], batch
    calls = []
    blocks = BLOCKS[arch](model)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    handles.append(HEAD_MODULE[arch](model).register_forward_hook(lambda m, a, o: calls.append("head")))
    try:
        with torch.no_grad():
            get_activation_at(model, base, mask, ["$L:1$H:0$[0:8]", "$L:0$H:2$[0:8]"])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_get_activation_keeps_grad_only_when_enabled(models, batch):
    model, (base, mask, _, _) = models["bert"], batch
    (with_grad,) = get_activation_at(model, base, mask, ["$L:1$H:0$[0:8]"])
    with torch.no_grad():
        (without,) = get_activation_at(model, base, mask, ["$L:1$H:0$[0:8]"])
    assert with_grad.requires_grad and not without.requires_grad


def test_hooks_are_removed_after_reads_and_interventions(models, batch):
    model, (base, mask, dual, dual_mask) = models["bert"], batch
    blocks = BLOCKS["bert"](model)
    before = [len(b._forward_hooks) for b in blocks]
    with torch.no_grad():
        values = get_activation_at(model, dual, dual_mask, NAMES)
        interchange_with_activation_at(model, base, mask, values, NAMES, *_masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2))
    assert [len(b._forward_hooks) for b in blocks] == before


def test_hooks_are_removed_when_the_forward_fails(models, batch):
    model, (base, mask, dual, dual_mask) = models["bert"], batch
    blocks = BLOCKS["bert"](model)
    before = [len(b._forward_hooks) for b in blocks]
    with torch.no_grad():
        values = get_activation_at(model, dual, dual_mask, NAMES)
        bad_ids = base.clone()
        bad_ids[0, 0] = VOCAB + 5  # out of the vocabulary: the embedding lookup raises
        with pytest.raises(IndexError):
            interchange_with_activation_at(
                model, bad_ids, mask, values, NAMES, *_masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2)
            )
    assert [len(b._forward_hooks) for b in blocks] == before


# ----------------------------------------------------------------------------------------------- writes


def _reference_overwrite(values, names, rows_base, rows_dual):
    """`{layer: [(row, base position, start, stop, value)]}` built with per-row loops."""
    overwrite = {}
    for value, name in zip(values, names, strict=False):
        layer, head, loc = parse_variable_name(name)
        d0, d1 = loc.start, loc.stop
        for row, (bpos, dpos) in enumerate(zip(rows_base, rows_dual, strict=False)):
            for b, d in zip(sorted(bpos), sorted(dpos), strict=False):  # k-th selected base <- k-th selected dual
                overwrite.setdefault(layer, []).append(
                    (row, b, head * HEAD_DIM + d0, head * HEAD_DIM + d1, value[row, d])
                )
    return overwrite


@pytest.mark.parametrize("arch", ARCHS)
def test_intervention_matches_a_loop_reference(models, arch, batch):
    model, (base, mask, dual, dual_mask) = models[arch], batch
    rows_base, rows_dual = [[1, 4, 6], [0, 5]], [[0, 2, 5], [3, 6]]  # different positions and counts per row
    with torch.no_grad():
        values = get_activation_at(model, dual, dual_mask, NAMES)
        cf = interchange_with_activation_at(
            model, base, mask, values, NAMES, *_masks(rows_base, rows_dual, SEQ, SEQ - 2)
        )
        ref_outputs, ref_logits = _block_outputs(
            arch, model, base, mask, _reference_overwrite(values, NAMES, rows_base, rows_dual)
        )
    if arch in FINAL_NORM:
        ref_outputs[-1] = FINAL_NORM[arch](model)(ref_outputs[-1])
    torch.testing.assert_close(cf.logits, ref_logits)
    for k in range(LAYERS):
        torch.testing.assert_close(cf.hidden_states[k + 1], ref_outputs[k])
    torch.testing.assert_close(cf.last_hidden_state, ref_outputs[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_intervention_handles_a_row_with_no_positions(models, arch, batch):
    model, (base, mask, dual, dual_mask) = models[arch], batch
    with torch.no_grad():
        values = get_activation_at(model, dual, dual_mask, NAMES)
        cf = interchange_with_activation_at(
            model, base, mask, values, NAMES, *_masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2)
        )
        plain = model(input_ids=base, attention_mask=mask)
        ref_outputs, ref_logits = _block_outputs(
            arch, model, base, mask, _reference_overwrite(values, NAMES, ROWS_BASE, ROWS_DUAL)
        )
    torch.testing.assert_close(cf.logits[1], plain.logits[1])  # row 1 untouched
    torch.testing.assert_close(cf.logits, ref_logits)
    assert not torch.allclose(cf.logits[0], plain.logits[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_hidden_states_show_the_intervention_after_a_warm_forward(arch, batch):
    # A first forward with output_hidden_states installs Hugging Face's own recording hooks on the
    # blocks; the intervention hook must still run before them.
    model, (base, mask, dual, dual_mask) = _fresh_model(arch), batch
    base_mask, dual_sel = _masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2)
    name = ["$L:0$H:[0:4]$[0:8]"]
    names = deserialize_variable_name(name[0])
    with torch.no_grad():
        model(input_ids=base, attention_mask=mask, output_hidden_states=True)
        values = get_activation_at(model, dual, dual_mask, names)
        cf = interchange_with_activation_at(model, base, mask, values, names, base_mask, dual_sel)
    source_rows = torch.cat(values, dim=-1)[dual_sel]  # (n, DIM)
    torch.testing.assert_close(cf.hidden_states[1][base_mask], source_rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_intervention_is_identity_when_source_equals_base(models, arch, batch):
    model, (base, mask, _, _) = models[arch], batch
    positions = torch.zeros(2, SEQ, dtype=torch.bool)
    positions[0, [0, 3, 4]] = True
    positions[1, [2, 5]] = True
    with torch.no_grad():
        values = get_activation_at(model, base, mask, NAMES)
        cf = interchange_with_activation_at(model, base, mask, values, NAMES, positions, positions)
        plain = model(input_ids=base, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(cf.logits, plain.logits)
    for got, expected in zip(cf.hidden_states, plain.hidden_states, strict=False):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_intervention_without_logits_runs_only_the_backbone(models, arch, batch):
    model, (base, mask, dual, dual_mask) = models[arch], batch
    base_mask, dual_sel = _masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2)
    head_calls = []
    handle = HEAD_MODULE[arch](model).register_forward_hook(lambda m, a, o: head_calls.append(1))
    try:
        with torch.no_grad():
            values = get_activation_at(model, dual, dual_mask, NAMES)
            full = interchange_with_activation_at(model, base, mask, values, NAMES, base_mask, dual_sel)
            head_calls.clear()
            lean = interchange_with_activation_at(
                model, base, mask, values, NAMES, base_mask, dual_sel, compute_logits=False
            )
            assert lean.logits is None and head_calls == []
            rows = lm_head_logits(model, lean.last_hidden_state[mask.bool()])
    finally:
        handle.remove()
    torch.testing.assert_close(rows, full.logits[mask.bool()])


def test_several_variables_in_one_layer_use_one_hook(models, batch):
    model, (base, mask, dual, dual_mask) = models["bert"], batch
    block = BLOCKS["bert"](model)[0]
    seen = []
    pre = block.register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks)))
    try:
        with torch.no_grad():
            baseline = len(block._forward_hooks)
            names = deserialize_variable_name("$L:0$H:[0:4]$[0:8]")
            values = get_activation_at(model, dual, dual_mask, names)
            seen.clear()
            masks = _masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2)
            interchange_with_activation_at(model, base, mask, values, names, *masks)
    finally:
        pre.remove()
    assert seen == [baseline + 1]


def test_mismatched_position_counts_per_row_are_an_invariant_error(models, batch):
    model, (base, mask, dual, dual_mask) = models["bert"], batch
    with torch.no_grad():
        values = get_activation_at(model, dual, dual_mask, NAMES)
        with pytest.raises(AssertionError, match="different counts"):
            interchange_with_activation_at(
                model, base, mask, values, NAMES, *_masks([[1, 2], []], [[1], [2]], SEQ, SEQ - 2)
            )


def test_overlapping_variables_in_one_layer_are_refused(models, batch):
    model, (base, mask, dual, dual_mask) = models["bert"], batch
    names = ["$L:1$H:0$[0:6]", "$L:1$H:0$[4:8]"]
    with torch.no_grad():
        values = get_activation_at(model, dual, dual_mask, names)
        masks = _masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2)
        with pytest.raises(UserError, match="overlap in layer 1"):
            interchange_with_activation_at(model, base, mask, values, names, *masks)


def test_variable_outside_the_model_is_refused(models, batch):
    model, (base, mask, _, _) = models["bert"], batch
    with pytest.raises(UserError, match=r"\$L:3\$H:0\$\[0:8\]"):
        get_activation_at(model, base, mask, ["$L:3$H:0$[0:8]"])


@pytest.mark.parametrize("arch", ["distilbert", "gpt2"])
def test_student_gets_gradients_through_its_source_run(arch):
    # Base and dual use disjoint token ids, so an embedding row of a dual token can only get a gradient
    # through the source run (get_activation_at with grad) feeding the counterfactual run. The output
    # projection is untied so that it does not give every embedding row a gradient of its own.
    torch.manual_seed(0)
    config = _tiny_config(arch)
    config.tie_word_embeddings = False
    model = MODEL_CLASSES[arch](config).eval()
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(3)
    base = torch.randint(3, 60, (2, SEQ), generator=g)
    dual = torch.randint(60, VOCAB, (2, SEQ), generator=g)
    base_mask, dual_sel = _masks([[1, 4], [2]], [[0, 3], [5]], SEQ, SEQ)
    names = deserialize_variable_name("$L:0$H:[0:4]$[0:8]")
    embedding = model.get_input_embeddings().weight
    dual_rows = torch.unique(dual)

    def grad_on_dual_rows(detach: bool) -> torch.Tensor:
        model.zero_grad()
        values = get_activation_at(model, dual, None, names)
        if detach:
            values = [v.detach() for v in values]
        cf = interchange_with_activation_at(model, base, None, values, names, base_mask, dual_sel)
        cf.logits.logsumexp(-1).sum().backward()
        return embedding.grad[dual_rows].abs().sum()

    assert grad_on_dual_rows(detach=False) > 0
    assert grad_on_dual_rows(detach=True) == 0


def _count_nodes(grad_fn, name: str) -> int:
    """Autograd nodes called `name` in the graph below `grad_fn` (each counted once)."""
    seen, stack, count = set(), [grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_token_embeddings_change_no_value_and_no_gradient(arch):
    # Three runs (base, a dual of another length, the base again) with and without the shared
    # lookup: equal outputs and equal gradients everywhere; one embedding backward instead of three.
    torch.manual_seed(0)
    model = MODEL_CLASSES[arch](_tiny_config(arch)).eval()
    g = torch.Generator().manual_seed(5)
    base, dual, other = (torch.randint(3, VOCAB, shape, generator=g) for shape in [(2, SEQ), (2, SEQ - 3), (2, 4)])
    embedding = model.get_input_embeddings()

    def runs(shared: bool):
        model.zero_grad(set_to_none=True)
        context = shared_token_embeddings(model, [base, dual]) if shared else torch.enable_grad()
        with context:
            outs = [model(input_ids=ids).logits for ids in (base, dual, base, other)]
        loss = sum(o.square().mean() for o in outs)
        lookups = _count_nodes(loss.grad_fn, "EmbeddingBackward0")
        loss.backward()
        return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, lookups

    plain_outs, plain_grads, plain_lookups = runs(shared=False)
    shared_outs, shared_grads, shared_lookups = runs(shared=True)
    assert plain_lookups - shared_lookups == 2  # base twice and dual: one lookup instead of three
    for a, b in zip(plain_outs, shared_outs, strict=False):
        torch.testing.assert_close(a, b)
    assert plain_grads.keys() == shared_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The hook is gone afterwards: a new lookup is the module's own forward (Gemma's scales its rows).
    assert not embedding._forward_hooks
    assert torch.equal(embedding(base), type(embedding).forward(embedding, base))
    scale = DIM**0.5 if arch == "gemma" else 1.0
    torch.testing.assert_close(embedding(base), embedding.weight[base] * scale)


# ----------------------------------------------------------------------------------------------- restart


@pytest.mark.parametrize("arch", ARCHS)
def test_restart_from_cached_block_input_equals_full_intervention(models, arch, batch):
    model, (base, mask, dual, dual_mask) = models[arch], batch
    base_mask, dual_sel = _masks([[1, 4, 6], [0, 5]], [[0, 2, 5], [3, 6]], SEQ, SEQ - 2)
    names = deserialize_variable_name("$L:1$H:[1:3]$[2:8]") + deserialize_variable_name("$L:2$H:0$[0:8]")
    extra = get_architecture(model).forward_kwargs
    with torch.no_grad():
        with record_block_inputs(model) as cache:
            model(input_ids=base, attention_mask=mask, **extra)
        values = get_activation_at(model, dual, dual_mask, names)
        full = interchange_with_activation_at(model, base, mask, values, names, base_mask, dual_sel)
        restarted = run_blocks_from(model, cache, 1, values, names, base_mask, dual_sel)
    torch.testing.assert_close(restarted.logits, full.logits)
    torch.testing.assert_close(restarted.last_hidden_state, full.last_hidden_state)
    for k in range(1, LAYERS + 1):
        torch.testing.assert_close(restarted.hidden_states[k], full.hidden_states[k])
    assert restarted.hidden_states[0] is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [1, LAYERS - 1])
def test_restart_above_the_intervened_block_equals_full_intervention(models, arch, layer, batch):
    # The teacher's restart: block `layer`'s recorded output gets the interventions written in, and
    # only the blocks above run again, replaying the recorded mask / rotary / position arguments.
    model, (base, mask, dual, dual_mask) = models[arch], batch
    base_mask, dual_sel = _masks([[1, 4, 6], [0, 5]], [[0, 2, 5], [3, 6]], SEQ, SEQ - 2)
    names = deserialize_variable_name(f"$L:{layer}$H:[1:3]$[2:8]") + deserialize_variable_name(
        f"$L:{LAYERS - 1}$H:0$[0:8]"
    )
    extra = get_architecture(model).forward_kwargs
    with torch.no_grad():
        with record_block_inputs(model, hidden_input_layers=[layer + 1]) as cache:
            model(input_ids=base, attention_mask=mask, **extra)
        values = get_activation_at(model, dual, dual_mask, names)
        full = interchange_with_activation_at(model, base, mask, values, names, base_mask, dual_sel)
        above = run_blocks_above(model, cache, layer, values, names, base_mask, dual_sel)
    torch.testing.assert_close(above.logits, full.logits)
    torch.testing.assert_close(above.last_hidden_state, full.last_hidden_state)
    for k in range(layer + 1, LAYERS + 1):
        torch.testing.assert_close(above.hidden_states[k], full.hidden_states[k])
    assert all(h is None for h in above.hidden_states[: layer + 1])


@pytest.mark.parametrize("arch", DECODER_FAMILIES)
def test_decoder_blocks_are_replayed_with_their_rotary_and_mask_arguments(models, arch, batch):
    model, (base, mask, _, _) = models[arch], batch
    with torch.no_grad(), record_block_inputs(model) as cache:
        model(input_ids=base, attention_mask=mask, use_cache=False)
    kwargs = cache.kwargs[1]
    cos, sin = kwargs["position_embeddings"]
    head_dim = DECODER_HEAD_DIM.get(arch, DIM // HEADS)
    assert cos.shape[-2:] == (SEQ, head_dim) and sin.shape == cos.shape
    assert torch.equal(kwargs["position_ids"].reshape(-1), torch.arange(SEQ))
    assert "attention_mask" in kwargs


# ------------------------------------------------------------------------------------- $H with GQA, head_dim


@pytest.mark.parametrize("arch", sorted(DECODER_HEAD_DIM))
def test_head_slices_ignore_config_head_dim_and_kv_heads(models, arch, batch):
    # head_dim 16 x 4 heads = 64 != hidden 32, and 2 key/value heads: $H:h is still dims [8h, 8h + 8)
    # of the 32-wide block output.
    model, (base, mask, _, _) = models[arch], batch
    assert model.config.head_dim * HEADS != DIM and model.config.num_key_value_heads < HEADS
    with torch.no_grad():
        values = get_activation_at(model, base, mask, ["$L:1$H:3$[0:8]", "$L:0$H:1$[2:5]"])
        outputs, _ = _block_outputs(arch, model, base, mask)
    torch.testing.assert_close(values[0], outputs[1][..., 24:32])
    torch.testing.assert_close(values[1], outputs[0][..., 10:13])
    with pytest.raises(UserError, match="does not fit the model .*4 heads of 8 dims"):
        get_activation_at(model, base, mask, ["$L:0$H:0$[0:16]"])
    validate_neuron_mapping([(["$L:2$H:[0:4]$[0:8]"], ["$L:0$H:3$[0:8]"])], model.config, model.config)
    with pytest.raises(UserError, match=r"slice \[0:16\] exceeds the teacher's head size 8 \(hidden size 32 // 4"):
        validate_neuron_mapping([(["$L:2$H:0$[0:16]"], ["$L:0$H:3$[0:8]"])], model.config, model.config)


def test_restart_below_an_intervened_layer_is_refused(models, batch):
    model, (base, mask, dual, dual_mask) = models["bert"], batch
    with torch.no_grad():
        with record_block_inputs(model) as cache:
            model(input_ids=base, attention_mask=mask)
        values = get_activation_at(model, dual, dual_mask, ["$L:0$H:0$[0:8]"])
        with pytest.raises(UserError, match="below an intervention at layer 0"):
            run_blocks_from(model, cache, 1, values, ["$L:0$H:0$[0:8]"], *_masks(ROWS_BASE, ROWS_DUAL, SEQ, SEQ - 2))


def test_record_block_inputs_keeps_only_requested_hidden_inputs(models, batch):
    model, (base, mask, _, _) = models["bert"], batch
    with torch.no_grad(), record_block_inputs(model, hidden_input_layers=[2]) as cache:
        model(input_ids=base, attention_mask=mask)
    assert list(cache.hidden) == [2] and sorted(cache.kwargs) == [0, 1, 2]
    with pytest.raises(UserError, match="no recorded input for block 1"):
        run_blocks_from(model, cache, 1)
