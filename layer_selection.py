"""Which teacher blocks a student keeps, by measured importance on a calibration corpus.

Two published rules, both read from the hidden states `h_0 .. h_L` of an L-block teacher, `h_i` being
block i's input and `h_{i+1}` its output (the last block's output taken before any final norm):

* ``block_influence`` (ShortGPT, Men et al. 2024): block i's score is the mean over real tokens of
  ``1 - cos(h_i, h_{i+1})``; the student keeps the blocks with the highest scores, in teacher order.
  Block 0 and the last block are not forced in: the scores decide (on trained decoders they score
  highest and are kept anyway).
* ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): to drop
  n blocks, the score of start l is ``d(l, l + n) = arccos(cos(h_l, h_{l+n})) / pi``; the run
  ``l .. l+n-1`` with the smallest score is dropped. The paper reads the last token only; here the
  distance is averaged over every real token, as block influence is.

"Real tokens" are the non-padding positions of each sequence (the attention mask); the sequences'
own framing tokens (BOS, CLS, SEP, EOS) count. Ties keep the earlier block / drop the earlier run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from architectures import get_architecture, max_positions
from token_store import TokenSequences, check_vocab_range, load_sequences
from utils import UserError

MEASURED = ("angular", "block_influence")
BATCH_SIZE = 8


@dataclass
class Selection:
    """A measured choice: `layers` kept (increasing), `scores` (per block, or per start block for angular)
    and what a score is (`meaning`)."""

    method: str
    layers: list[int]
    scores: list[float]
    meaning: str
    n_sequences: int
    n_tokens: int


def load_calibration(path: str, n_sequences: int, vocab_size: int, max_length: int) -> list[np.ndarray]:
    """The first `n_sequences` non-empty sequences of a binarized corpus, each cut to `max_length` ids.

    The first ones, not a sample: the choice is reproducible and does not move when the corpus grows.
    Ids outside `[0, vocab_size)` are refused. Errors name --calibration_file.
    """
    try:
        store = load_sequences(path)
        seqs = list(itertools.islice((s[:max_length] for s in store if len(s) > 0), n_sequences))
        if not seqs:
            raise UserError(f"{path} holds no tokens")
        check_vocab_range(TokenSequences.from_list(seqs), vocab_size, path)
    except UserError as e:
        raise UserError(f"--calibration_file: {' '.join(str(e).split())}") from None
    return seqs


def block_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """`L + 1` float32 `(bs, seq, dim)` tensors: the inputs of blocks 0..L-1, then the last block's output.

    `output_hidden_states` gives the first L; its last entry is the backbone's output, which has the
    final norm applied in the decoders and GPT-2, so the last block's own output is read by a hook.
    """
    row = get_architecture(model)
    backbone = model.get_submodule(row.backbone)
    blocks = backbone.get_submodule(row.blocks)
    last: list[torch.Tensor] = []

    def keep_output(module: nn.Module, args: tuple, output) -> None:
        last.append(output[0] if isinstance(output, tuple) else output)

    handle = blocks[-1].register_forward_hook(keep_output)
    try:
        out = backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **row.forward_kwargs
        )
    finally:
        handle.remove()
    return [h.float() for h in out.hidden_states[: len(blocks)]] + [last[0].float()]


@torch.no_grad()
def mean_cosine_distances(
    model: nn.Module, sequences: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]], angular: bool
) -> tuple[list[float], int]:
    """For each `(a, b)` in `pairs`, the mean over real tokens of `1 - cos(h_a, h_b)` (or, with `angular`,
    of `arccos(cos(h_a, h_b)) / pi`), `h` as in `block_states`; also the number of real tokens.

    Sequences are run in batches of `BATCH_SIZE`, padded on the right and masked.
    """
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    n_tokens = 0
    for start in range(0, len(sequences), BATCH_SIZE):
        batch = sequences[start : start + BATCH_SIZE]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq.astype(np.int64))
            mask[row, : len(seq)] = 1
        states = block_states(model, ids, mask)
        real = mask.bool()
        for k, (a, b) in enumerate(pairs):
            cos = nn.functional.cosine_similarity(states[a], states[b], dim=-1)[real].double()
            term = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi if angular else 1.0 - cos
            sums[k] += term.sum()
        n_tokens += int(real.sum())
    return (sums / n_tokens).tolist(), n_tokens


def keep_by_block_influence(scores: Sequence[float], n_keep: int) -> list[int]:
    """The `n_keep` blocks with the highest scores (ties: the earlier block), in increasing order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return sorted(int(i) for i in order[:n_keep])


def keep_by_angular(distances: Sequence[float], n_teacher: int, n_keep: int) -> list[int]:
    """All blocks but the run `l .. l+n-1` (n = n_teacher - n_keep) whose `d(l, l+n)` is smallest."""
    n_drop = n_teacher - n_keep
    assert len(distances) == n_teacher - n_drop + 1, (len(distances), n_teacher, n_drop)
    start = int(np.argmin(distances))
    return [i for i in range(n_teacher) if not start <= i < start + n_drop]


def select_layers(model: nn.Module, method: str, n_keep: int, calibration_file: str, n_sequences: int) -> Selection:
    """Measure `method` on the first `n_sequences` of `calibration_file` and choose `n_keep` teacher blocks."""
    config = model.config
    n_teacher = config.num_hidden_layers
    if not 1 <= n_keep <= n_teacher:
        raise UserError(f"cannot extract {n_keep} layers from {n_teacher}: the teacher has {n_teacher} blocks")
    seqs = load_calibration(calibration_file, n_sequences, config.vocab_size, max_positions(config))
    if method == "block_influence":
        scores, n_tokens = mean_cosine_distances(model, seqs, [(i, i + 1) for i in range(n_teacher)], angular=False)
        layers = keep_by_block_influence(scores, n_keep)
        meaning = "per teacher block i: mean over real tokens of 1 - cos(h_i, h_(i+1))"
    elif method == "angular":
        n_drop = n_teacher - n_keep
        pairs = [(start, start + n_drop) for start in range(n_teacher - n_drop + 1)]
        scores, n_tokens = mean_cosine_distances(model, seqs, pairs, angular=True)
        layers = keep_by_angular(scores, n_teacher, n_keep)
        meaning = f"per start block l: mean over real tokens of arccos(cos(h_l, h_(l+{n_drop}))) / pi"
    else:
        raise AssertionError(method)
    return Selection(method, layers, scores, meaning, len(seqs), n_tokens)
