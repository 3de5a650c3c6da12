"""Variable names and neuron-mapping files: which hidden units a DIITO step interchanges.

A *variable* is a slice of one block's output hidden state, named `$L:<layer>$H:<head>$[<d0>:<d1>]`:
hidden dims `[head * w + d0, head * w + d1)` of the output of transformer block `layer` (0-based),
i.e. `hidden_states[layer + 1]` of a Hugging Face output, with `w = hidden_size // num_attention_heads`.
Layer and head may be half-open ranges `[a:b]`; `deserialize_variable_name` expands them.

`$H` slices the residual stream, not the attention's internals: the site is the block's output
(hidden_size wide), cut into `num_attention_heads` equal slices of `w` dims. The slice width does
not depend on `config.head_dim` (Qwen3 and Gemma configs may set `head_dim * num_attention_heads !=
hidden_size`) nor on `num_key_value_heads` (grouped-query attention): a head index names a slice
of the residual stream, read and written at the same place; a slice wider than `w` is refused.

A neuron mapping (`.nm` file) pairs teacher NAMEs with student NAMEs; each step samples one pair
(`sample_interchange_variables`). `interventions.py` reads and writes the named variables.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from architectures import head_slice_width, hidden_size, num_heads, num_layers
from utils import UserError

__all__ = [
    "NeuronMapping",
    "deserialize_variable_name",
    "load_neuron_mapping",
    "parse_variable_name",
    "sample_interchange_variables",
    "validate_neuron_mapping",
]


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
        head_dim = head_slice_width(config)
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
