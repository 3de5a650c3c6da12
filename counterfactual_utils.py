"""Neuron mappings and interchange interventions on stock Hugging Face models.

A *variable* is a slice of one block's output hidden state, named `$L:<layer>$H:<head>$[<d0>:<d1>]`:
hidden dims `[head * w + d0, head * w + d1)` of the output of transformer block `layer` (0-based),
i.e. `hidden_states[layer + 1]` of a Hugging Face output, with `w = hidden_size // num_attention_heads`.
Layer and head may be half-open ranges `[a:b]`; `deserialize_variable_name` expands them.

`$H` slices the residual stream, not the attention's internals: the site is the block's output
(hidden_size wide), cut into `num_attention_heads` equal slices of `w` dims. The slice width does
not depend on `config.head_dim` (Qwen3 and Gemma configs may set `head_dim * num_attention_heads !=
hidden_size`) nor on `num_key_value_heads` (grouped-query attention): a head index names a slice
of the residual stream, read and written at the same place; a slice wider than `w` is refused.

Interventions are forward hooks on the blocks of an unmodified model. Where the blocks live and how
the LM head is applied is one row per architecture in `architectures.ARCHITECTURES` (pyvene style).

Decoders (GPT-2, Llama, Mistral, Qwen2/3, Gemma): the site is the output of block k *before* the
final norm (`ln_f`, `norm`), for every k. Hugging Face's last `hidden_states` entry has that norm
applied, so for the last block `hidden_states[L]` is `norm(site)`; read and write always use the
pre-norm value. Their blocks take rotary position embeddings, the causal mask and position ids as
keyword arguments: `record_block_inputs` records them and the restarts replay them verbatim.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from architectures import ARCHITECTURES, Architecture, get_architecture
from utils import UserError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BlockInputCache",
    "CounterfactualOutput",
    "activations_from_cache",
    "backbone",
    "deserialize_variable_name",
    "get_activation_at",
    "get_adapter",
    "hidden_size",
    "interchange_with_activation_at",
    "lm_head_logits",
    "load_neuron_mapping",
    "num_heads",
    "num_layers",
    "parse_variable_name",
    "record_block_inputs",
    "run_blocks_above",
    "run_blocks_from",
    "shared_token_embeddings",
    "sample_interchange_variables",
    "validate_neuron_mapping",
]


# ----------------------------------------------------------------------------------------------
# Where each architecture keeps its blocks and how its LM head is applied: the rows of
# `architectures.ARCHITECTURES` (kept here under their historical names).
# ----------------------------------------------------------------------------------------------

Adapter = Architecture
ADAPTERS: dict[str, Architecture] = ARCHITECTURES


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DataParallel / DistributedDataParallel wrapper (or the model itself)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def get_adapter(model: nn.Module) -> Architecture:
    """The `architectures` row for `model` (an LM model, its base model, or either wrapped in (D)DP)."""
    return get_architecture(_unwrap(model))


def backbone(model: nn.Module) -> nn.Module:
    """The base model (`BertModel`, `GPT2Model`, `LlamaModel`, ...) of `model`.

    A base model is its own backbone (the same rule as Hugging Face's `base_model`).
    """
    inner = _unwrap(model)
    return getattr(inner, get_adapter(inner).backbone, inner)


def _blocks(model: nn.Module) -> nn.ModuleList:
    return backbone(model).get_submodule(get_adapter(model).blocks)


def _final_norm(model: nn.Module) -> nn.Module | None:
    path = get_adapter(model).final_norm
    return None if path is None else backbone(model).get_submodule(path)


def lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head of `model` to final hidden states of any leading shape.

    hidden: `(..., dim)`, e.g. `(bs, seq, dim)` or `(n_selected, dim)` rows picked out of it;
    it is the backbone's `last_hidden_state` (for decoders, after the final norm). Returns `(..., vocab_size)`.
    """
    inner = _unwrap(model)
    if backbone(inner) is inner:
        raise UserError(f"{type(inner).__name__} has no LM head; use the *ForMaskedLM / *LMHeadModel class")
    return get_adapter(inner).head(inner, hidden)


def num_layers(model_or_config: nn.Module | Any) -> int:
    """Number of transformer blocks (`num_hidden_layers` / `n_layers` / `n_layer`)."""
    return int(_config(model_or_config).num_hidden_layers)


def num_heads(model_or_config: nn.Module | Any) -> int:
    """Number of attention heads (`num_attention_heads` / `n_heads` / `n_head`)."""
    return int(_config(model_or_config).num_attention_heads)


def hidden_size(model_or_config: nn.Module | Any) -> int:
    """Width of the hidden state (`hidden_size` / `dim` / `n_embd`)."""
    return int(_config(model_or_config).hidden_size)


def _config(model_or_config: nn.Module | Any) -> Any:
    # Hugging Face configs alias `num_hidden_layers`, `num_attention_heads` and `hidden_size` onto
    # DistilBERT's and GPT-2's own key names through `attribute_map`, so one spelling serves all four.
    if isinstance(model_or_config, nn.Module):
        return _unwrap(model_or_config).config
    return model_or_config


def _head_dim(model_or_config: nn.Module | Any) -> int:
    """Width of one `$H` slice: hidden_size // num_attention_heads (never config.head_dim; see the module doc)."""
    return hidden_size(model_or_config) // num_heads(model_or_config)


# ----------------------------------------------------------------------------------------------
# NAME grammar
# ----------------------------------------------------------------------------------------------

_INDEX = r"(\d+|\[\d+:\d+\])"
_NAME_RE = re.compile(r"^\$L:" + _INDEX + r"\$H:" + _INDEX + r"\$\[(\d+):(\d+)\]$")


def _index_range(text: str, name: str, what: str) -> range:
    if text.startswith("["):
        a, b = (int(x) for x in text[1:-1].split(":"))
        if a >= b:
            raise UserError(f"malformed variable name {name!r}: empty {what} range [{a}:{b}]")
        return range(a, b)
    return range(int(text), int(text) + 1)


def _parse(name: str) -> tuple[range, range, tuple[int, int]]:
    if not isinstance(name, str):
        raise UserError(f"malformed variable name {name!r}: expected a string like '$L:3$H:[0:12]$[0:64]'")
    match = _NAME_RE.match(name)
    if match is None:
        raise UserError(f"malformed variable name {name!r}: expected '$L:<layer>$H:<head>$[<d0>:<d1>]'")
    layers = _index_range(match.group(1), name, "layer")
    heads = _index_range(match.group(2), name, "head")
    d0, d1 = int(match.group(3)), int(match.group(4))
    if d0 >= d1:
        raise UserError(f"malformed variable name {name!r}: empty slice [{d0}:{d1}]")
    return layers, heads, (d0, d1)


def deserialize_variable_name(name: str) -> list[str]:
    """Expand layer and head ranges of `name` into single-variable names (layers x heads, same slice).

    `$L:[0:2]$H:[0:12]$[0:64]` -> `['$L:0$H:0$[0:64]', '$L:0$H:1$[0:64]', ..., '$L:1$H:11$[0:64]']`.
    """
    layers, heads, (d0, d1) = _parse(name)
    return [f"$L:{layer}$H:{head}$[{d0}:{d1}]" for layer in layers for head in heads]


def parse_variable_name(name: str) -> tuple[int, int, slice]:
    """A single (deserialized) NAME -> `(layer, head, slice(d0, d1))`, as the original's `np.s_[d0:d1]`.

    The slice indexes dims within the head's slice of the hidden state:
    `hidden[..., head * w:(head + 1) * w][..., loc]`.
    """
    layers, heads, (d0, d1) = _parse(name)
    if len(layers) != 1 or len(heads) != 1:
        raise UserError(f"variable name {name!r} names several variables; expand it with deserialize_variable_name")
    return layers[0], heads[0], slice(d0, d1)


def _sites(model: nn.Module, variable_names: Sequence[str]) -> dict[int, list[tuple[int, int, int]]]:
    """Group single names by layer: `{layer: [(variable index, start dim, stop dim), ...]}`."""
    d = _head_dim(model)
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
    embedding = _unwrap(model).get_input_embeddings()
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
    blocks = _blocks(model)
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
    with _hooks(handles):
        try:
            backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **get_adapter(model).forward_kwargs)
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

    blocks = _blocks(model)
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
    extra = get_adapter(model).forward_kwargs
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
    blocks = _blocks(model)
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
    blocks = _blocks(model)
    states: list[torch.Tensor | None] = [None] * start_layer + [hidden]
    with _hooks(handles):
        for layer in range(start_layer, len(blocks)):
            hidden = _block_hidden(blocks[layer](hidden, *cache.args[layer], **cache.kwargs[layer]))
            states.append(hidden)
    norm = _final_norm(model)
    if norm is not None:
        hidden = norm(hidden)
        states[-1] = hidden
    logits = lm_head_logits(model, hidden) if compute_logits else None
    return CounterfactualOutput(logits=logits, hidden_states=tuple(states), last_hidden_state=hidden)


# ----------------------------------------------------------------------------------------------
# Neuron mapping files
# ----------------------------------------------------------------------------------------------

NeuronMapping = list[tuple[list[str], list[str]]]


def load_neuron_mapping(path: str | Path) -> NeuronMapping:
    """Read a `.nm` file into `[(teacher_names, student_names), ...]` (NAMEs as written, not expanded).

    Checks the structure and the NAME grammar; `validate_neuron_mapping` checks against the models.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"neuron mapping not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read neuron mapping {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"neuron mapping {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "interchange_variable_mappings" not in data:
        raise UserError(f"neuron mapping {path} has no 'interchange_variable_mappings' key")
    entries = data["interchange_variable_mappings"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"neuron mapping {path}: 'interchange_variable_mappings' must be a non-empty list")
    mapping: NeuronMapping = []
    for n, entry in enumerate(entries):
        sides = []
        for key in ("teacher_variable_names", "student_variable_names"):
            if not isinstance(entry, dict) or key not in entry:
                raise UserError(f"neuron mapping {path}: entry {n} has no {key!r}")
            names = entry[key]
            if not isinstance(names, list) or not names:
                raise UserError(f"neuron mapping {path}: entry {n} {key!r} must be a non-empty list of NAMEs")
            for name in names:
                try:
                    _parse(name)
                except UserError as e:
                    raise UserError(f"neuron mapping {path}: entry {n}: {e}") from None
            sides.append(list(names))
        mapping.append((sides[0], sides[1]))
    return mapping


def validate_neuron_mapping(
    mapping: NeuronMapping, teacher_config: Any, student_config: Any, path: str | Path = "<neuron mapping>"
) -> None:
    """Refuse NAMEs that do not fit their model, before any model is built.

    Each side is checked against its own config (any family of `architectures.ARCHITECTURES`):
    layer < number of layers, head < num_attention_heads, 0 <= d0 < d1 <= hidden_size //
    num_attention_heads (the `$H` slice width, whatever `head_dim` and `num_key_value_heads` are).
    Teacher and student intervene independently, so their widths need not match.
    """
    if not mapping:
        raise UserError(f"neuron mapping {path} is empty")
    for side, config in (("teacher", teacher_config), ("student", student_config)):
        n_layers, n_heads, dim = num_layers(config), num_heads(config), hidden_size(config)
        if dim % n_heads:
            raise UserError(f"{side} config: hidden size {dim} is not divisible by {n_heads} heads")
        head_dim = dim // n_heads
        for n, entry in enumerate(mapping):
            names = entry[0] if side == "teacher" else entry[1]
            if not names:
                raise UserError(f"neuron mapping {path}: entry {n} has no {side} variables")
            for name in names:
                try:
                    layers, heads, (d0, d1) = _parse(name)
                except UserError as e:
                    raise UserError(f"neuron mapping {path}: entry {n}: {e}") from None
                where = f"neuron mapping {path}: entry {n} {side} variable {name!r}"
                if layers.stop > n_layers:
                    raise UserError(f"{where}: layer {layers.stop - 1} >= the {side}'s {n_layers} layers")
                if heads.stop > n_heads:
                    raise UserError(f"{where}: head {heads.stop - 1} >= the {side}'s {n_heads} heads")
                if d1 > head_dim:
                    raise UserError(
                        f"{where}: slice [{d0}:{d1}] exceeds the {side}'s head size {head_dim} "
                        f"(hidden size {dim} // {n_heads} heads)"
                    )


def sample_interchange_variables(
    mapping: NeuronMapping, rng: random.Random | np.random.Generator
) -> tuple[list[str], list[str]]:
    """Pick one entry uniformly, then one teacher NAME and one student NAME in it; expand both.

    rng: a seeded `random.Random` or `numpy.random.Generator`; seeded alike on every rank, all ranks
    pick the same variables. Returns `(teacher single names, student single names)`.
    """

    def pick(n: int) -> int:
        if isinstance(rng, np.random.Generator):
            return int(rng.integers(n))
        return rng.randrange(n)

    teacher_names, student_names = mapping[pick(len(mapping))]
    teacher_name = teacher_names[pick(len(teacher_names))]
    student_name = student_names[pick(len(student_names))]
    return deserialize_variable_name(teacher_name), deserialize_variable_name(student_name)
