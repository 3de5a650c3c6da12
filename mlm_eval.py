"""Held-out evaluation of masked LMs: fixed masked batches, MLM loss and accuracy, and the
interchange-intervention comparison of a student with its teacher.

    heldout = make_dataset(load_store("data/binarized_text.heldout.pickle", vocab), tokenizer, config, seed)
    scores = HeldoutMlm(teacher, heldout, teacher_vars, student_vars, seed=56).score(student)

Every model is scored on the same predictions: the masks come from a fixed seed, uniformly over the
non-special tokens, all replaced by [MASK] (`masked_heldout_batches`); interchange accuracy uses
(base, source) pairs masked and given interchange positions once (`heldout_pairs`). Works for BERT
and DistilBERT masked LMs (`architectures.backbone` / `lm_head_logits`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

# Re-exported so the quickstart and fit_mlm_head take every helper from here.
from architectures import backbone, lm_head_logits, max_positions, special_token_ids  # noqa: F401  (re-exported)
from interventions import get_activation_at, interchange_with_activation_at
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from losses import IGNORE_INDEX
from masking import MlmMasker, real_token_mask, sample_interchange_masks
from token_store import TokenSequences, check_vocab_range, load_sequences
from utils import UserError

__all__ = [
    "HeldoutMlm",
    "PairBatch",
    "collate",
    "eval_masker",
    "evaluate_mlm",
    "heldout_pairs",
    "load_store",
    "make_dataset",
    "masked_heldout_batches",
    "masked_logits",
    "max_positions",
    "predictions",
    "special_token_ids",
    "unigram_baseline",
]

MlmBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels: each (bs, L)


# --- data ---------------------------------------------------------------------------------------


def load_store(path: str | os.PathLike, vocab_size: int) -> TokenSequences:
    """A binarized corpus, checked to hold ids below `vocab_size`."""
    store = load_sequences(path)
    check_vocab_range(store, vocab_size, path)
    return store


def make_dataset(store: TokenSequences, tokenizer, model_config, seed: int) -> LmSeqsDataset:
    """Sequences filtered and chunked to the model's input size, as for distillation."""
    params = DatasetParams(max_positions(model_config), True, special_token_ids(tokenizer), seed=seed)
    return LmSeqsDataset(params, store)


def collate(dataset: LmSeqsDataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (bs, L), padded with the pad id, and lengths (bs,) of sequences `indices`."""
    ids, lengths, _, _ = dataset.batch_sequences([dataset[int(i)] for i in indices])
    return ids, lengths


def eval_masker(vocab_size: int, special_ids: dict[str, int], mask_prop: float = 0.15) -> MlmMasker:
    """Uniform masking for evaluation: every non-special token equally likely, always [MASK]."""
    probs = torch.ones(vocab_size)
    probs[list(special_ids.values())] = 0.0
    return MlmMasker(probs, torch.tensor([1.0, 0.0, 0.0]), mask_prop, special_ids["mask_token"], vocab_size)


def masked_heldout_batches(
    dataset: LmSeqsDataset, vocab_size: int, batch_size: int, seed: int = 0, mask_prop: float = 0.15
) -> list[MlmBatch]:
    """The held-out set as fixed masked batches: (input_ids, attention_mask, labels), each (bs, L).

    Sequences in length order (little padding); ``ceil(mask_prop * tokens)`` targets per batch,
    uniformly among non-special tokens, all replaced by [MASK]; labels -100 elsewhere. The same
    seed gives the same masks, so every model is scored on the same predictions.
    """
    masker = eval_masker(vocab_size, dataset.params.special_token_ids, mask_prop)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for ids, lengths, _, _ in dataset.length_ordered_batches(batch_size):
        input_ids, labels = masker(ids, lengths, generator)
        batches.append((input_ids, real_token_mask(lengths, ids.size(1)).long(), labels))
    return batches


@dataclass
class PairBatch:
    """Held-out (base, source) pairs, masked and with interchange positions fixed. All (bs, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    dual_input_ids: torch.Tensor
    dual_attention_mask: torch.Tensor
    interchange_mask: torch.Tensor
    dual_interchange_mask: torch.Tensor
    rows: torch.Tensor  # bool: the base's masked positions, where predictions are compared


def heldout_pairs(
    dataset: LmSeqsDataset, vocab_size: int, batch_size: int, seed: int, interchange_prop: float
) -> list[PairBatch]:
    """Each held-out sequence as a base with its dataset dual as the source, prepared as in training:
    both masked (uniformly, [MASK] only), one consecutive span of `interchange_prop` of the tokens."""
    masker = eval_masker(vocab_size, dataset.params.special_token_ids)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for ids, lengths, dual_ids, dual_lengths in dataset.length_ordered_batches(batch_size):
        input_ids, labels = masker(ids, lengths, generator)
        dual_input_ids, _ = masker(dual_ids, dual_lengths, generator)
        imask, dmask = sample_interchange_masks(
            lengths,
            dual_lengths,
            ids.size(1),
            dual_ids.size(1),
            prop=interchange_prop,
            consecutive=True,
            generator=generator,
        )
        batches.append(
            PairBatch(
                input_ids,
                real_token_mask(lengths, ids.size(1)).long(),
                dual_input_ids,
                real_token_mask(dual_lengths, dual_ids.size(1)).long(),
                imask,
                dmask,
                labels != IGNORE_INDEX,
            )
        )
    return batches


# --- scores -------------------------------------------------------------------------------------


def masked_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """(N, vocab) LM-head logits at the N True positions of `rows` (bs, L); BERT or DistilBERT."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return lm_head_logits(model, hidden[rows])


@torch.no_grad()
def evaluate_mlm(model: nn.Module, batches: list[MlmBatch], desc: str = "held-out MLM") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy at the masked positions of `masked_heldout_batches`."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for input_ids, attention_mask, labels in tqdm(batches, desc=desc, leave=False):
        rows = labels != IGNORE_INDEX
        logits = masked_logits(model, input_ids, attention_mask, rows)
        targets = labels[rows]
        loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        n += int(rows.sum())
    model.train(was_training)
    if n == 0:
        raise UserError("the held-out set has no maskable token")
    return {"mlm_loss": loss_sum / n, "mlm_accuracy": correct / n, "n_predictions": n}


@torch.no_grad()
def predictions(model: nn.Module, batches: list[PairBatch], variables: list | None) -> torch.Tensor:
    """Top-1 ids at every batch's `rows`, concatenated: after the interchange of `variables`
    (deserialized names, `neuron_mapping`), or on the plain base input when None."""
    was_training = model.training
    model.eval()
    out = []
    for b in batches:
        if variables is None:
            logits = masked_logits(model, b.input_ids, b.attention_mask, b.rows)
        else:
            source = get_activation_at(model, b.dual_input_ids, b.dual_attention_mask, variables)
            run = interchange_with_activation_at(
                model,
                b.input_ids,
                b.attention_mask,
                source,
                variables,
                b.interchange_mask,
                b.dual_interchange_mask,
                compute_logits=False,
            )
            logits = lm_head_logits(model, run.last_hidden_state[b.rows])
        out.append(logits.argmax(-1))
    model.train(was_training)
    return torch.cat(out)


def unigram_baseline(counts: np.ndarray, special_ids: dict[str, int], batches: list[MlmBatch]) -> dict:
    """The held-out MLM score of ignoring the context: the training corpus's word frequencies
    (add-one smoothed, special ids 0) as the prediction everywhere; its top-1 is the most frequent id."""
    p = torch.tensor(counts, dtype=torch.float64) + 1
    p[list(special_ids.values())] = 0
    log_p = (p / p.sum()).log()
    targets = torch.cat([labels[labels != IGNORE_INDEX] for _, _, labels in batches])
    top = int(p.argmax())
    return {
        "mlm_loss": float(-log_p[targets].mean()),
        "mlm_accuracy": float((targets == top).float().mean()),
        "top_id": top,
    }


class HeldoutMlm:
    """A teacher and a held-out set, prepared once; `score` rates any masked LM on them.

    Agreement with the teacher: how often the model's top-1 equals the teacher's at the masked
    positions of the pairs' bases. Interchange accuracy: the same after the interchange of the
    student's variables, compared with the teacher after the interchange of the teacher's.
    """

    def __init__(
        self,
        teacher: nn.Module,
        dataset: LmSeqsDataset,
        teacher_variables: list,
        student_variables: list,
        seed: int,
        interchange_prop: float = 0.3,
        batch_size: int = 64,
    ):
        vocab = teacher.config.vocab_size
        self.teacher, self.student_variables = teacher, student_variables
        self.mlm_batches = masked_heldout_batches(dataset, vocab, batch_size, seed=seed)
        self.pairs = heldout_pairs(dataset, vocab, batch_size, seed + 1, interchange_prop)
        self.teacher_base = predictions(teacher, self.pairs, None)
        self.teacher_interchange = predictions(teacher, self.pairs, teacher_variables)

    @property
    def n_positions(self) -> int:
        """Masked base positions compared for agreement and interchange accuracy."""
        return int(sum(int(b.rows.sum()) for b in self.pairs))

    def score(self, model: nn.Module, desc: str = "held-out MLM") -> dict[str, float]:
        """mlm_loss, mlm_accuracy, n_predictions, teacher_agreement, interchange_accuracy."""
        row = evaluate_mlm(model, self.mlm_batches, desc=desc)
        row["teacher_agreement"] = float((predictions(model, self.pairs, None) == self.teacher_base).float().mean())
        row["interchange_accuracy"] = float(
            (predictions(model, self.pairs, self.student_variables) == self.teacher_interchange).float().mean()
        )
        return row
