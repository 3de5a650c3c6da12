"""Interchange interventions on stock Hugging Face models: read, write and restart at block outputs.

A variable (`$L:<layer>$H:<head>$[<d0>:<d1>]`, see `neuron_mapping.py`) is a slice of the output of
one transformer block. Interventions are forward hooks on the blocks of an unmodified model: where
the blocks live and how the LM head is applied is one row per architecture in
`architectures.ARCHITECTURES` (pyvene style).

Decoders (GPT-2, Llama, Mistral, Qwen2/3, Gemma): the site is the output of block k *before* the
final norm (`ln_f`, `norm`), for every k. Hugging Face's last `hidden_states` entry has that norm
applied, so for the last block `hidden_states[L]` is `norm(site)`; read and write always use the
pre-norm value. Their blocks take rotary position embeddings, the causal mask and position ids as
keyword arguments: `record_block_inputs` records them and the restarts replay them verbatim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from architectures import (
    backbone,
    final_norm,
    get_architecture,
    head_slice_width,
    lm_head_logits,
    num_heads,
    num_layers,
    transformer_blocks,
    unwrap,
)
from neuron_mapping import parse_variable_name
from utils import UserError

__all__ = [
    "BlockInputCache",
    "CounterfactualOutput",
    "activations_from_cache",
    "get_activation_at",
    "interchange_with_activation_at",
    "record_block_inputs",
    "run_blocks_above",
    "run_blocks_from",
    "shared_token_embeddings",
]

# ----------------------------------------------------------------------------------------------
# Where the variables sit
# ----------------------------------------------------------------------------------------------


def _sites(model: nn.Module, variable_names: Sequence[str]) -> dict[int, list[tuple[int, int, int]]]:
    """Group single names by layer: `{layer: [(variable index, start dim, stop dim), ...]}`."""
    d = head_slice_width(model)
    n_layers, n_heads = num_layers(model), num_heads(model)
    sites: dict[int, list[tuple[int, int, int]]] = {}
    for i, name in enumerate(variable_names):
        layer, head, loc = parse_variable_name(name)
        d0, d1 = loc.start, loc.stop
        if layer >= n_layers or head >= n_heads or d1 > d:
            raise UserError(
                f"variable {name!r} does not fit the model ({n_layers} layers, {n_heads} heads of {d} dims)"
            )
        sites.setdefault(layer, []).append((i, head * d + d0, head * d + d1))
    return sites


# ----------------------------------------------------------------------------------------------
# Reading activations
# ----------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook on the deepest block a read needs, so no upper block or head runs."""


def _block_hidden(output: Any) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older / other blocks return a tuple whose first item is it.
    return output[0] if isinstance(output, tuple) else output


def _with_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def shared_token_embeddings(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the `with` body, the model's token-embedding lookups of `inputs` share one lookup.

    The rows of every `(bs, seq)` tensor in `inputs` are looked up together, once, and a forward
    whose input ids equal one of them gets its slice of that lookup. Values are unchanged; the
    gradient reaches the embedding matrix through one embedding backward instead of one per run,
    which spares a dense `(V, D)` gradient (and its accumulation) per extra run. Ids equal to none
    of `inputs` are looked up as usual. The shared lookup calls the embedding module itself, so a
    scaling inside it (Gemma's sqrt(hidden_size)) is applied exactly as in a plain forward.
    """
    embedding = unwrap(model).get_input_embeddings()
    flat = torch.cat([ids.reshape(-1) for ids in inputs])
    looked_up = embedding(flat).split([ids.numel() for ids in inputs])
    shared = [(ids, rows.view(*ids.shape, -1)) for ids, rows in zip(inputs, looked_up, strict=False)]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        for candidate, rows in shared:
            if ids.shape == candidate.shape and torch.equal(ids, candidate):
                return rows
        return output

    with _hooks([embedding.register_forward_hook(hook)]):
        yield


def get_activation_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    variable_names: Sequence[str],
) -> list[torch.Tensor]:
    """Values of single variables on an input, one `(bs, seq, d1 - d0)` tensor per name, in order.

    input_ids, attention_mask: `(bs, seq)`. Only blocks up to the deepest named layer run (no upper
    block, no head). Gradients flow if the caller has grad enabled; wrap in `torch.no_grad()` for a
    teacher. The backbone is called directly, bypassing any (D)DP wrapper.
    """
    if not variable_names:
        raise UserError("get_activation_at needs at least one variable name")
    sites = _sites(model, variable_names)
    blocks = transformer_blocks(model)
    deepest = max(sites)
    values: list[torch.Tensor | None] = [None] * len(variable_names)

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _block_hidden(output)
            for i, start, stop in sites[layer]:
                values[i] = hidden[..., start:stop]
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in sites]
    extra = get_architecture(model).forward_kwargs
    with _hooks(handles):
        try:
            backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **extra)
        except _StopForward:
            pass
    assert all(v is not None for v in values), "a read hook did not fire"
    return values  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Writing activations (the counterfactual run)
# ----------------------------------------------------------------------------------------------


@dataclass
class CounterfactualOutput:
    """Output of a counterfactual run.

    logits: `(bs, seq, vocab)`, or None when the head was not applied.
    hidden_states: `num_layers + 1` tensors `(bs, seq, dim)` like Hugging Face's (entry k + 1 is
        block k's output after the intervention; for decoders the last one has the final norm applied). From
        `run_blocks_from`, entries below `start_layer` are None.
    last_hidden_state: `(bs, seq, dim)`, what the LM head takes (decoders: after the final norm).
    """

    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor | None, ...]
    last_hidden_state: torch.Tensor


@dataclass
class _Writes:
    """What a counterfactual run writes: per intervened layer, the dims and the values at the base positions."""

    rows: torch.Tensor  # (n,) base row of each interchanged position, row-major
    positions: torch.Tensor  # (n,) its position in that row
    per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (dims (m,), values (n, m))

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `layer`'s output `(bs, seq, dim)` with the interventions written in (a new tensor)."""
        dim_index, value = self.per_layer[layer]
        # Write into a copy: the block's output may be saved by autograd for its own backward.
        new = hidden.clone()
        new[self.rows[:, None], self.positions[:, None], dim_index.to(new.device)[None, :]] = value.to(new.dtype)
        return new


def _prepare_writes(
    model: nn.Module,
    interchanged_variables: Sequence[torch.Tensor],
    variable_names: Sequence[str],
    interchange_mask: torch.Tensor,
    dual_interchange_mask: torch.Tensor,
) -> _Writes:
    if len(interchanged_variables) != len(variable_names):
        raise UserError(
            f"{len(interchanged_variables)} interchanged variables for {len(variable_names)} variable names"
        )
    sites = _sites(model, variable_names)
    interchange_mask = interchange_mask.bool()
    dual_interchange_mask = dual_interchange_mask.bool()
    assert torch.equal(interchange_mask.sum(-1), dual_interchange_mask.sum(-1)), (
        "interchange_mask and dual_interchange_mask select different counts per row"
    )
    # nonzero() and boolean indexing both enumerate row-major, so the k-th True of row r in the base
    # and in the dual line up without a loop over rows.
    rows, positions = interchange_mask.nonzero(as_tuple=True)  # (n,), (n,)

    per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, variables in sites.items():
        dims, values = [], []
        for i, start, stop in variables:
            source = interchanged_variables[i]  # (bs, dual_seq, stop - start)
            assert source.shape[:2] == dual_interchange_mask.shape and source.shape[-1] == stop - start, (
                f"interchanged variable {i} has shape {tuple(source.shape)}, expected "
                f"{tuple(dual_interchange_mask.shape) + (stop - start,)} for {variable_names[i]!r}"
            )
            dims.append(torch.arange(start, stop, device=source.device))
            values.append(source[dual_interchange_mask])  # (n, stop - start)
        dim_index = torch.cat(dims)
        if dim_index.unique().numel() != dim_index.numel():
            names = [variable_names[i] for i, _, _ in variables]
            raise UserError(f"variables {names} overlap in layer {layer}")
        per_layer[layer] = (dim_index, torch.cat(values, dim=-1))
    return _Writes(rows, positions, per_layer)


def _interchange_hooks(
    model: nn.Module, writes: _Writes, skip: Sequence[int] = ()
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register one write hook per intervened block (but those in `skip`); the caller removes the handles."""

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _with_block_hidden(output, writes.apply(layer, _block_hidden(output)))

        return hook

    blocks = transformer_blocks(model)
    # prepend=True: Hugging Face records hidden_states with its own forward hooks on the same blocks;
    # ours must run first so that the recorded hidden_states[k + 1] is the intervened value.
    return [
        blocks[layer].register_forward_hook(make_hook(layer), prepend=True)
        for layer in writes.per_layer
        if layer not in skip
    ]


def interchange_with_activation_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    interchanged_variables: Sequence[torch.Tensor],
    variable_names: Sequence[str],
    interchange_mask: torch.Tensor,
    dual_interchange_mask: torch.Tensor,
    compute_logits: bool = True,
) -> CounterfactualOutput:
    """Counterfactual forward on the base input with variables overwritten by source values.

    input_ids, attention_mask, interchange_mask: `(bs, seq)`; dual_interchange_mask: `(bs, dual_seq)`.
    interchanged_variables[i]: `(bs, dual_seq, d1 - d0)`, the source values of variable_names[i]
    (single names, as from `get_activation_at` on the dual input). At each variable's site, the base
    value at the k-th True position of row r of `interchange_mask` is replaced by the source value at
    the k-th True position of row r of `dual_interchange_mask`; blocks above are recomputed.
    With `compute_logits=False` only the backbone runs (apply `lm_head_logits` to selected rows).
    With it, the full model runs through any (D)DP wrapper `model` has.
    """
    writes = _prepare_writes(model, interchanged_variables, variable_names, interchange_mask, dual_interchange_mask)
    handles = _interchange_hooks(model, writes)
    extra = get_architecture(model).forward_kwargs
    with _hooks(handles):
        runner = model if compute_logits else backbone(model)
        out = runner(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
    # Hugging Face ties hidden_states[-1] to last_hidden_state (after the final norm, if any).
    return CounterfactualOutput(
        logits=out.logits if compute_logits else None,
        hidden_states=tuple(out.hidden_states),
        last_hidden_state=out.hidden_states[-1],
    )


# ----------------------------------------------------------------------------------------------
# Restart from a cached block input
# ----------------------------------------------------------------------------------------------


@dataclass
class BlockInputCache:
    """What each block was called with during a recorded forward.

    hidden: `{layer: (bs, seq, dim)}` the block's input hidden state (for the recorded layers); key
        `num_layers` holds the last block's output (before any final norm). Entry k + 1 is block k's
        output, its variables' site.
    args, kwargs: `{layer: ...}` the block's other positional and keyword arguments (attention mask in
        the model's internal format, position ids, ...), replayed verbatim.
    """

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    args: dict[int, tuple] = field(default_factory=dict)
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)


@contextmanager
def record_block_inputs(
    model: nn.Module, hidden_input_layers: Sequence[int] | None = None
) -> Iterator[BlockInputCache]:
    """Record the inputs of every block during the forwards run inside the `with` body.

    hidden_input_layers: layers whose input hidden state is kept (default all blocks); the restart only
    needs the one it starts from. `num_layers` keeps the last block's output. Record a base run in eval
    mode, without a KV cache: a restart is exact only if blocks are deterministic and stateless.
    Tensors are kept as the forward made them (with their autograd graph, if any).
    """
    cache = BlockInputCache()
    blocks = transformer_blocks(model)
    keep = set(range(len(blocks))) if hidden_input_layers is None else set(hidden_input_layers)

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if layer in keep:
                cache.hidden[layer] = args[0]
            cache.args[layer] = tuple(args[1:])
            cache.kwargs[layer] = dict(kwargs)

        return hook

    def keep_last_output(module: nn.Module, args: Any, output: Any) -> None:
        cache.hidden[len(blocks)] = _block_hidden(output)

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    if len(blocks) in keep:
        handles.append(blocks[-1].register_forward_hook(keep_last_output))
    with _hooks(handles):
        yield cache


def activations_from_cache(
    model: nn.Module, cache: BlockInputCache, variable_names: Sequence[str], rows: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Values of single variables in a recorded forward, as `get_activation_at` would return them.

    Block k's output is the recorded input of block k + 1 (record layers k + 1). rows: `(n,)` batch
    rows to take, in that order (e.g. a permutation of the batch); default all. Returns one
    `(n, seq, d1 - d0)` tensor per name, keeping gradients.
    """
    values: list[torch.Tensor | None] = [None] * len(variable_names)
    for layer, variables in _sites(model, variable_names).items():
        if layer + 1 not in cache.hidden:
            raise UserError(f"block {layer}'s output was not recorded; record layer {layer + 1}")
        hidden = cache.hidden[layer + 1]
        if rows is not None:
            hidden = hidden[rows]
        for i, start, stop in variables:
            values[i] = hidden[..., start:stop]
    return values  # type: ignore[return-value]


def run_blocks_from(
    model: nn.Module,
    cache: BlockInputCache,
    start_layer: int,
    interchanged_variables: Sequence[torch.Tensor] = (),
    variable_names: Sequence[str] = (),
    interchange_mask: torch.Tensor | None = None,
    dual_interchange_mask: torch.Tensor | None = None,
    compute_logits: bool = True,
) -> CounterfactualOutput:
    """Re-run blocks `start_layer..L-1` (+ final norm, + head) from a recorded block input.

    Equal to `interchange_with_activation_at` on the recorded input when every intervened layer is
    `>= start_layer` (the blocks below are unaffected by the intervention). Shapes as there; in the
    returned `hidden_states`, entries `0..start_layer-1` are None and entry `start_layer` is the
    cached input.
    """
    writes = None
    if variable_names:
        lowest = min(parse_variable_name(name)[0] for name in variable_names)
        if lowest < start_layer:
            raise UserError(f"cannot restart at block {start_layer} below an intervention at layer {lowest}")
        assert interchange_mask is not None and dual_interchange_mask is not None
        writes = _prepare_writes(model, interchanged_variables, variable_names, interchange_mask, dual_interchange_mask)
    return _run_from(model, cache, start_layer, writes, compute_logits)


def run_blocks_above(
    model: nn.Module,
    cache: BlockInputCache,
    layer: int,
    interchanged_variables: Sequence[torch.Tensor],
    variable_names: Sequence[str],
    interchange_mask: torch.Tensor,
    dual_interchange_mask: torch.Tensor,
    compute_logits: bool = True,
) -> CounterfactualOutput:
    """The counterfactual run from block `layer`'s recorded output: blocks `layer+1..L-1` (+ norm, + head).

    The interventions at `layer` are written straight into its recorded output (record layer
    `layer + 1`; for the last block, `num_layers`), so block `layer` does not run again; those above
    are written by hooks. Equal to `interchange_with_activation_at` on the recorded input when no
    intervened layer is below `layer`. Shapes as there; in `hidden_states`, entries `0..layer` are None.
    """
    lowest = min(parse_variable_name(name)[0] for name in variable_names)
    if lowest < layer:
        raise UserError(f"cannot restart above block {layer}: an intervention is at layer {lowest}")
    writes = _prepare_writes(model, interchanged_variables, variable_names, interchange_mask, dual_interchange_mask)
    return _run_from(model, cache, layer + 1, writes, compute_logits, write_input=layer in writes.per_layer)


def _run_from(
    model: nn.Module,
    cache: BlockInputCache,
    start_layer: int,
    writes: _Writes | None,
    compute_logits: bool,
    write_input: bool = False,
) -> CounterfactualOutput:
    """Blocks `start_layer..L-1` from the recorded input of `start_layer`; `write_input`: block
    `start_layer - 1`'s interventions are written into that input first."""
    if start_layer not in cache.hidden:
        raise UserError(f"no recorded input for block {start_layer}; record it with record_block_inputs")
    hidden = cache.hidden[start_layer]
    if write_input:
        hidden = writes.apply(start_layer - 1, hidden)
    handles = [] if writes is None else _interchange_hooks(model, writes, skip=[start_layer - 1])
    blocks = transformer_blocks(model)
    states: list[torch.Tensor | None] = [None] * start_layer + [hidden]
    with _hooks(handles):
        for layer in range(start_layer, len(blocks)):
            hidden = _block_hidden(blocks[layer](hidden, *cache.args[layer], **cache.kwargs[layer]))
            states.append(hidden)
    norm = final_norm(model)
    if norm is not None:
        hidden = norm(hidden)
        states[-1] = hidden
    logits = lm_head_logits(model, hidden) if compute_logits else None
    return CounterfactualOutput(logits=logits, hidden_states=tuple(states), last_hidden_state=hidden)
