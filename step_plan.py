"""What one DIITO step computes, decided before any model runs.

The distiller draws a step's randomness (`CausalDistiller._plan`: the MLM corruption of base and
dual, the fast-mode source rows, the mapping entry, the interchanged positions) into `StepDraws`;
`build_plan` turns those draws into a `StepPlan` without drawing anything, so a test can build
one by hand. `DiitoRuns` (diito_runs.py) runs a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

import losses
from masking import real_token_mask, swap_tokens


class Mode(Enum):
    """The counterfactual run of a step."""

    PLAIN = "plain"  # no counterfactual run (both causal alphas 0)
    INTERCHANGE = "interchange"  # hidden states from a source run on the dual (the method)
    FAST_INTERCHANGE = "fast_interchange"  # --fast_mode: source values from other rows of the base run
    TOKEN_SWAP = "token_swap"  # --data_augment: a plain run on the base with dual tokens swapped in


def step_mode(causal: bool, data_augment: bool, fast_mode: bool) -> Mode:
    """The mode of every step of a run: `causal` (a causal alpha > 0), --data_augment, --fast_mode."""
    if not causal:
        return Mode.PLAIN
    return Mode.TOKEN_SWAP if data_augment else Mode.FAST_INTERCHANGE if fast_mode else Mode.INTERCHANGE


@dataclass(frozen=True)
class Side:
    """One side of a (base, dual) pair as the models see it.

    ids (bs, L) long: the MLM-corrupted ids (CLM: the ids); labels (bs, L) long: MLM targets or
    the ids themselves on real tokens (CLM), -100 elsewhere; None for a fast-mode dual (other rows
    of the base, whose labels no loss reads); lengths (bs,) long: real tokens per row.
    """

    ids: torch.Tensor
    labels: torch.Tensor | None
    lengths: torch.Tensor


@dataclass(frozen=True)
class Pairing:
    """What a DIITO step draws beyond its base: the dual side and where the two meet.

    interchange_mask (bs, L) bool over the base and dual_interchange_mask (bs, L') bool over the
    dual: the paired positions (as many per row on both sides). variables: (teacher variables,
    student variables) of the drawn mapping entry; None with --data_augment. source_rows (bs,)
    long: in fast mode, the base row whose values row r receives (the dual is then those rows).
    """

    dual: Side
    interchange_mask: torch.Tensor
    dual_interchange_mask: torch.Tensor
    variables: tuple[list[str], list[str]] | None
    source_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class StepDraws:
    """Everything a step drew: the base side, and for a DIITO step the pairing."""

    base: Side
    pairing: Pairing | None = None

    def mirrored(self, variables: tuple[list[str], list[str]] | None) -> StepDraws:
        """The same draws with the roles swapped, (dual, base), and another mapping entry: the
        --include_crossway sub-step, as the original ran it (same corruption, mirrored positions)."""
        p = self.pairing
        return StepDraws(
            base=p.dual,
            pairing=Pairing(
                dual=self.base,
                interchange_mask=p.dual_interchange_mask,
                dual_interchange_mask=p.interchange_mask,
                variables=variables,
            ),
        )


@dataclass
class StepPlan:
    """What one step computes. bs rows of L tokens; N selected rows.

    Every mode: input_ids (bs, L) long model input; attention_mask (bs, L) long or None (CLM);
    select (bs, L) bool, the rows that get logits; hidden_rows (bs, L) bool or None, the rows of
    last hidden states (cos losses); labels (N,) long, the selected rows' MLM targets or next
    tokens (-100: none); lm_rows (N,) bool or None, the selected rows the mlm / clm loss reads;
    draws: what the plan was built from.
    Counterfactual modes: interchange_mask (bs, L) bool over the base and dual_interchange_mask
    (bs, L') bool over the dual, the paired positions. INTERCHANGE: dual_ids (bs, L') and
    dual_attention_mask, and the variables per model. FAST_INTERCHANGE: source_rows (bs,) long,
    the base row whose values row r receives, and the variables. TOKEN_SWAP: swapped_ids (bs, L).
    """

    mode: Mode
    draws: StepDraws
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    select: torch.Tensor
    hidden_rows: torch.Tensor | None
    labels: torch.Tensor
    lm_rows: torch.Tensor | None = None
    interchange_mask: torch.Tensor | None = None
    dual_interchange_mask: torch.Tensor | None = None
    teacher_variables: list[str] | None = None
    student_variables: list[str] | None = None
    dual_ids: torch.Tensor | None = None
    dual_attention_mask: torch.Tensor | None = None
    source_rows: torch.Tensor | None = None
    swapped_ids: torch.Tensor | None = None


def build_plan(draws: StepDraws, *, mode: Mode, mlm: bool, restrict_ce_to_mask: bool, need_hidden: bool) -> StepPlan:
    """The plan of `draws`; draws nothing.

    mlm: MLM (else CLM: next-token labels, no attention mask); restrict_ce_to_mask: logits on the
    MLM targets only (else on every real token); need_hidden: a cos loss reads last hidden states.
    A PLAIN plan takes draws without a pairing, every other mode draws with one.
    """
    assert (mode is Mode.PLAIN) == (draws.pairing is None), f"{mode}: pairing {draws.pairing is not None}"
    base = draws.base
    attn = real_token_mask(base.lengths, base.ids.size(1))
    # Rows that get logits: the CE positions (all real tokens, or MLM targets only).
    lm_rows = None
    if mlm:
        select = base.labels != losses.IGNORE_INDEX if restrict_ce_to_mask else attn
        sel_labels = base.labels[select]
        if not restrict_ce_to_mask:
            # About 15% of the rows are MLM targets: no log-softmax over the vocabulary for the others.
            lm_rows = sel_labels != losses.IGNORE_INDEX
    else:
        select = attn
        # Next-token labels aligned with each position (the last real token has none).
        labels = base.labels
        next_labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), losses.IGNORE_INDEX)], 1)
        sel_labels = next_labels[select]
    plan = StepPlan(
        mode=mode,
        draws=draws,
        input_ids=base.ids,
        attention_mask=attn.long() if mlm else None,  # CLM: no mask, as in HF
        select=select,
        hidden_rows=attn if need_hidden else None,
        labels=sel_labels,
        lm_rows=lm_rows,
    )
    if mode is Mode.PLAIN:
        return plan
    p = draws.pairing
    plan.interchange_mask, plan.dual_interchange_mask = p.interchange_mask, p.dual_interchange_mask
    plan.source_rows = p.source_rows
    if p.variables is not None:
        plan.teacher_variables, plan.student_variables = p.variables
    if mode is Mode.TOKEN_SWAP:
        plan.swapped_ids = swap_tokens(base.ids, p.dual.ids, p.interchange_mask, p.dual_interchange_mask)
    elif mode is Mode.INTERCHANGE:
        plan.dual_ids = p.dual.ids
        plan.dual_attention_mask = real_token_mask(p.dual.lengths, p.dual.ids.size(1)).long() if mlm else None
    return plan


def pad_to_multiple(ids: torch.Tensor, multiple: int, pad_id: int) -> torch.Tensor:
    """(bs, L) ids padded on the right with `pad_id` to a width that is a multiple of `multiple`."""
    extra = -ids.size(1) % multiple
    return ids if extra == 0 else torch.cat([ids, ids.new_full((ids.size(0), extra), pad_id)], 1)


def crossway_batch(token_ids, lengths, dual_ids, dual_lengths):
    """(base, dual) -> (dual, base), cut to the dual's longest length as collation would.

    The dual is already padded or cut to the base's width, so the new width never exceeds it.
    """
    width = int(dual_lengths.max())
    return dual_ids[:, :width], dual_lengths, token_ids[:, :width], lengths.clamp(max=width)
