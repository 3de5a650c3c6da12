"""All runs of one model for one DIITO step: the base run and the counterfactual run a `StepPlan` calls for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from architectures import backbone, get_architecture, has_dropout, lm_head_logits, transformer_blocks
from interventions import (
    activations_from_cache,
    get_activation_at,
    interchange_with_activation_at,
    record_block_inputs,
    run_blocks_above,
    shared_token_embeddings,
)
from neuron_mapping import parse_variable_name
from step_plan import Mode, StepPlan


@dataclass
class ModelRuns:
    """Selected rows of one model's runs. logits (N, V), hidden (N_real, D); cf_*: the counterfactual run."""

    logits: torch.Tensor
    hidden: torch.Tensor | None
    cf_logits: torch.Tensor | None = None
    cf_hidden: torch.Tensor | None = None


class DiitoRuns(nn.Module):
    """All runs of one model for one step, in a single forward: one method per `StepPlan.mode`.

    The student is wrapped in this module (then in DDP), so DDP sees exactly one forward per
    backward however many runs DIITO makes. The teacher uses it too, under no_grad.

    The runs: the base run; for an interchange, the source run on the dual, which stops after the
    deepest intervened block, and the counterfactual run on the base. The LM head runs on the
    selected rows only. Below the lowest intervened block the counterfactual run computes what the
    base run computed, so it restarts from the base run's recorded output of that block when that
    is exact -- the model draws no dropout masks: it is in eval mode (the teacher), or it has no
    dropout (a Llama-family student) -- or when fast mode allows it (a training student with dropout
    then shares the base run's masks below the intervention).
    """

    def __init__(self, model: nn.Module, recompute_blocks: bool = False):
        super().__init__()
        self.model = model
        self.has_dropout = has_dropout(model)  # rates are fixed for the run; only the mode changes
        if recompute_blocks:
            recompute_in_backward(model)

    @property
    def draws_dropout_masks(self) -> bool:
        """Whether a run draws new dropout masks, so that two runs differ below an intervention."""
        return self.model.training and self.has_dropout

    def forward(self, plan: StepPlan, variables: list[str] | None) -> ModelRuns:
        """The runs `plan.mode` calls for; `variables`: this model's intervened variables."""
        run = {
            Mode.PLAIN: self.plain,
            Mode.INTERCHANGE: self.interchange,
            Mode.FAST_INTERCHANGE: self.fast_interchange,
            Mode.TOKEN_SWAP: self.token_swap,
        }[plan.mode]
        return run(plan, variables)

    def plain(self, plan: StepPlan, variables: None = None) -> ModelRuns:
        """The base run alone."""
        return ModelRuns(*self._run(plan.input_ids, plan))

    def token_swap(self, plan: StepPlan, variables: None = None) -> ModelRuns:
        """The base run, and a plain run on the token-swapped base as the counterfactual run."""
        runs = self.plain(plan)
        runs.cf_logits, runs.cf_hidden = self._run(plan.swapped_ids, plan)
        return runs

    def interchange(self, plan: StepPlan, variables: list[str]) -> ModelRuns:
        """Base run, source run on the dual, counterfactual run with the source values interchanged."""
        if not self.draws_dropout_masks:
            return self._restart_above(plan, variables, fast=False)
        # Dropout draws new masks in every run: the counterfactual run recomputes every block.
        # The three runs' token embeddings come from one lookup (one embedding backward).
        with shared_token_embeddings(self.model, [plan.input_ids, plan.dual_ids]):
            runs = self.plain(plan)
            source = get_activation_at(self.model, plan.dual_ids, plan.dual_attention_mask, variables)
            out = interchange_with_activation_at(
                self.model,
                plan.input_ids,
                plan.attention_mask,
                source,
                variables,
                plan.interchange_mask,
                plan.dual_interchange_mask,
                compute_logits=False,
            )
        runs.cf_logits, runs.cf_hidden = self._rows(out.last_hidden_state, plan)
        return runs

    def fast_interchange(self, plan: StepPlan, variables: list[str]) -> ModelRuns:
        """Base run, and the counterfactual run with source values from rows `plan.source_rows` of it."""
        return self._restart_above(plan, variables, fast=True)

    def _restart_above(self, plan: StepPlan, variables: list[str], fast: bool) -> ModelRuns:
        layers = sorted({parse_variable_name(name)[0] for name in variables})
        # Recorded: the lowest intervened block's output (where the restart begins) and, in fast
        # mode, every intervened block's output (the source values).
        record = {layers[0] + 1} | ({k + 1 for k in layers} if fast else set())
        with record_block_inputs(self.model, record) as cache:
            runs = self.plain(plan)
        if fast:
            source = activations_from_cache(self.model, cache, variables, rows=plan.source_rows)
        else:
            source = get_activation_at(self.model, plan.dual_ids, plan.dual_attention_mask, variables)
        out = run_blocks_above(
            self.model,
            cache,
            layers[0],
            source,
            variables,
            plan.interchange_mask,
            plan.dual_interchange_mask,
            compute_logits=False,
        )
        runs.cf_logits, runs.cf_hidden = self._rows(out.last_hidden_state, plan)
        return runs

    def _run(self, input_ids: torch.Tensor, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = backbone(self.model)(
            input_ids=input_ids, attention_mask=plan.attention_mask, **get_architecture(self.model).forward_kwargs
        )
        return self._rows(out.last_hidden_state, plan)

    def _rows(self, h: torch.Tensor, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = h[plan.hidden_rows] if plan.hidden_rows is not None else None
        return lm_head_logits(self.model, h[plan.select]), hidden


def recompute_in_backward(model: nn.Module) -> None:
    """--gradient_checkpointing: each transformer block keeps only its inputs for backward and recomputes
    its activations there (`torch.utils.checkpoint`, non-reentrant; dropout masks are replayed).

    Only the block's own `forward` is checkpointed, not the module call, so the hooks -- the
    interventions' reads and interchanges, FSDP's gathers -- run once, in the forward, outside the
    recomputed part: the recomputation never depends on a hook that the step has removed by then.
    Done here rather than with `gradient_checkpointing_enable`, so that this placement does not depend
    on how the installed transformers release wraps its layers. A block is wrapped once.
    """
    for block in transformer_blocks(model):
        if getattr(block, "_recomputes_in_backward", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._recomputes_in_backward = True
