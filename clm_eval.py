"""Held-out evaluation of causal LMs: perplexity, next-token accuracy, agreement with the teacher,
and the interchange-intervention comparison of a student with its teacher.

    dataset = make_dataset(mlm_eval.load_store("data/binarized_text.heldout.smollm2.pickle", vocab), tokenizer,
                           config, seed=56)
    scores = HeldoutClm(teacher, dataset, teacher_vars, student_vars, seed=56).score(student)

Every model is scored on the same predictions. Each held-out sequence predicts its next token at
every position but the last (the end token is a target, the start token is not): the mean
cross-entropy there is the NLL, ``perplexity = exp(NLL)``, and the top-1 next token gives the
accuracy and, compared with the teacher's top-1 at the same positions, the agreement with the
teacher. Interchange accuracy uses (base, source) pairs -- each held-out sequence as the base, its
dataset dual as the source -- with one consecutive span of ``interchange_prop`` of the tokens
interchanged, drawn once from a fixed seed as in training: the model's next-token top-1 after the
interchange of its variables is compared with the teacher's after the interchange of the
teacher's, at the base positions after the span (the positions before it cannot change in a
causal model; the span's own positions are left out so that what is scored is what the
intervention carried forward). Works for every decoder family of `architectures.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from architectures import backbone, get_architecture, lm_head_logits, max_positions, special_token_ids
from interventions import get_activation_at, record_block_inputs, run_blocks_above
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from losses import IGNORE_INDEX
from masking import real_token_mask, sample_interchange_masks
from neuron_mapping import parse_variable_name
from token_store import TokenSequences
from utils import UserError

__all__ = ["ClmBatch", "HeldoutClm", "heldout_batches", "make_dataset", "model_predictions", "unigram_baseline"]


def make_dataset(store: TokenSequences, tokenizer, model_config, seed: int) -> LmSeqsDataset:
    """Sequences framed, filtered and chunked as for causal distillation (the family's row)."""
    params = DatasetParams(
        max_positions(model_config), False, special_token_ids(tokenizer), seed=seed, family=model_config.model_type
    )
    return LmSeqsDataset(params, store)


@dataclass
class ClmBatch:
    """Held-out sequences with their next-token targets and a fixed interchange. (bs, L) unless noted.

    targets: the next token at each position, -100 where there is none (the last real token, padding).
    dual_input_ids (bs, L'): the sources; interchange_mask / dual_interchange_mask (bs, L) / (bs, L'):
    one span each, paired position by position. after_span: positions after the base's span that
    have a target (where interchange accuracy is scored).
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    dual_input_ids: torch.Tensor
    interchange_mask: torch.Tensor
    dual_interchange_mask: torch.Tensor
    after_span: torch.Tensor


def heldout_batches(dataset: LmSeqsDataset, batch_size: int, seed: int, interchange_prop: float) -> list[ClmBatch]:
    """The held-out set in length order (little padding), every base paired with its dataset dual."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for ids, lengths, dual_ids, dual_lengths in dataset.length_ordered_batches(batch_size):
        width = ids.size(1)
        has_next = real_token_mask(lengths - 1, width)  # positions 0 .. length - 2
        targets = torch.cat([ids[:, 1:], ids.new_full((ids.size(0), 1), IGNORE_INDEX)], 1)
        targets = targets.masked_fill(~has_next, IGNORE_INDEX)
        imask, dmask = sample_interchange_masks(
            lengths, dual_lengths, width, dual_ids.size(1), prop=interchange_prop, consecutive=True, generator=generator
        )
        span_end = (imask.long() * torch.arange(width)).amax(1)  # last interchanged position per row
        after = (torch.arange(width)[None, :] > span_end[:, None]) & has_next
        batches.append(ClmBatch(ids, targets, dual_ids, imask, dmask, after))
    return batches


@dataclass
class Predictions:
    """One model's outputs on the held-out batches, concatenated over batches."""

    nll_sum: float  # summed next-token cross-entropy (nats)
    top1: torch.Tensor  # (N,) next-token top-1 at every target position
    correct: int  # of those, how many equal the target
    interchange_top1: torch.Tensor | None  # (M,) top-1 after the interchange, at the after-span positions


@torch.no_grad()
def model_predictions(
    model: nn.Module, batches: list[ClmBatch], variables: list[str] | None, desc: str = "held-out CLM"
) -> Predictions:
    """Base run of every batch (NLL, top-1) and, with `variables` (deserialized names), the counterfactual
    run: the source run on the dual up to the intervened block, then the blocks above it restarted from
    the base run's recorded output of the lowest intervened block (exact: the model is in eval mode)."""
    was_training = model.training
    model.eval()
    layer = None if variables is None else min(parse_variable_name(name)[0] for name in variables)
    nll_sum, correct, top1, cf_top1 = 0.0, 0, [], []
    extra = get_architecture(model).forward_kwargs
    for b in tqdm(batches, desc=desc, leave=False):
        rows = b.targets != IGNORE_INDEX
        record = () if layer is None else (layer + 1,)
        with record_block_inputs(model, record) as cache:
            hidden = backbone(model)(input_ids=b.input_ids, **extra).last_hidden_state
        logits = lm_head_logits(model, hidden[rows]).float()
        targets = b.targets[rows]
        nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        top1.append(logits.argmax(-1))
        correct += int((top1[-1] == targets).sum())
        if layer is not None:
            source = get_activation_at(model, b.dual_input_ids, None, variables)
            out = run_blocks_above(
                model,
                cache,
                layer,
                source,
                variables,
                b.interchange_mask,
                b.dual_interchange_mask,
                compute_logits=False,
            )
            cf_top1.append(lm_head_logits(model, out.last_hidden_state[b.after_span]).argmax(-1))
    model.train(was_training)
    return Predictions(nll_sum, torch.cat(top1), correct, None if layer is None else torch.cat(cf_top1))


def unigram_baseline(counts: np.ndarray, start_id: int | None, batches: list[ClmBatch]) -> dict:
    """Ignoring the context: the training corpus's token frequencies (add-one smoothed; the start token,
    never a target, gets 0) as the next-token distribution everywhere; its top-1 is the most frequent id."""
    p = torch.tensor(counts, dtype=torch.float64) + 1
    if start_id is not None:
        p[start_id] = 0
    log_p = (p / p.sum()).log()
    targets = torch.cat([b.targets[b.targets != IGNORE_INDEX] for b in batches])
    top = int(p.argmax())
    nll = float(-log_p[targets].mean())
    return {
        "nll": nll,
        "perplexity": float(np.exp(nll)),
        "accuracy": float((targets == top).float().mean()),
        "top_id": top,
    }


class HeldoutClm:
    """A teacher and a held-out set, prepared once; `score` rates any causal LM of the same vocabulary.

    Agreement with the teacher: how often the model's next-token top-1 equals the teacher's, over
    every target position. Interchange accuracy: the same after the interchange of the student's
    variables, compared with the teacher after the interchange of the teacher's, at the positions
    after the span.
    """

    def __init__(
        self,
        teacher: nn.Module,
        dataset: LmSeqsDataset,
        teacher_variables: list[str],
        student_variables: list[str],
        seed: int,
        interchange_prop: float = 0.3,
        batch_size: int = 16,
    ):
        self.teacher, self.student_variables = teacher, student_variables
        self.batches = heldout_batches(dataset, batch_size, seed, interchange_prop)
        if self.n_predictions == 0 or self.n_interchange_positions == 0:
            raise UserError("the held-out set is too small: no next-token prediction after an interchanged span")
        self.teacher_run = model_predictions(teacher, self.batches, teacher_variables, "held-out CLM: teacher")

    @property
    def n_predictions(self) -> int:
        return int(sum(int((b.targets != IGNORE_INDEX).sum()) for b in self.batches))

    @property
    def n_interchange_positions(self) -> int:
        return int(sum(int(b.after_span.sum()) for b in self.batches))

    @staticmethod
    def lm_scores(run: Predictions, n: int) -> dict[str, float]:
        nll = run.nll_sum / n
        return {"nll": nll, "perplexity": float(np.exp(nll)), "accuracy": run.correct / n, "n_predictions": n}

    def teacher_scores(self) -> dict[str, float]:
        """nll, perplexity, accuracy, n_predictions of the teacher."""
        return self.lm_scores(self.teacher_run, self.n_predictions)

    def score(self, model: nn.Module, desc: str = "held-out CLM") -> dict[str, float]:
        """nll, perplexity, accuracy, n_predictions, teacher_agreement, interchange_accuracy."""
        run = model_predictions(model, self.batches, self.student_variables, desc)
        row = self.lm_scores(run, self.n_predictions)
        row["teacher_agreement"] = float((run.top1 == self.teacher_run.top1).float().mean())
        row["interchange_accuracy"] = float((run.interchange_top1 == self.teacher_run.interchange_top1).float().mean())
        return row
