"""mlm_eval.py and masking's token-probability smoothing, on a tiny random BERT and hand-made counts;
and the quickstart's statistics over seeds (paired comparison, data multiple) on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BERT_SPECIAL_IDS
from scipy import stats
from transformers import AutoTokenizer, BertForMaskedLM

import mlm_eval
import quickstart
import token_store
from losses import IGNORE_INDEX
from masking import load_token_counts, token_probabilities
from neuron_mapping import deserialize_variable_name
from quickstart_lib.statistics import Metric, matching_multiple, paired_comparison
from utils import UserError

# --- smoothing ----------------------------------------------------------------------------------


def test_token_probabilities_are_smoothed_counts_with_special_ids_zero():
    counts = np.array([0, 1, 4, 9, 100, 7], dtype=np.int64)
    probs = token_probabilities(counts, 0.5, [0, 5])
    expected = [0.0, 1.0, 0.5, 1 / 3, 0.1, 0.0]  # max(count, 1) ** -0.5
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, torch.tensor(expected)), probs
    assert torch.equal(token_probabilities(counts, 0.0, []), torch.ones(6))


def test_load_token_counts_names_the_file_when_its_length_is_not_the_vocabulary(tmp_path):
    path = tmp_path / "counts.pickle"
    token_store.save_pickle([3, 1, 2], path)
    assert load_token_counts(path, 3).tolist() == [3.0, 1.0, 2.0]
    with pytest.raises(UserError, match=r"counts\.pickle has 3 entries, the vocabulary 5"):
        load_token_counts(path, 5)


# --- held-out scores ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_and_heldout(tmp_path_factory, tiny_bert_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_teacher)
    teacher = BertForMaskedLM.from_pretrained(tiny_bert_teacher).eval()
    texts = [
        f"sentence number {i} says that the {w} sat on a mat near the door ."
        for i, w in enumerate(["cat", "dog", "bird", "fox", "owl", "cow", "hen", "ant"])
    ]
    store = token_store.TokenSequences.from_list([np.array(tokenizer(t)["input_ids"], dtype=np.uint16) for t in texts])
    dataset = mlm_eval.make_dataset(store, tokenizer, teacher.config, seed=3)
    return teacher, dataset


def test_evaluate_mlm_equals_a_direct_cross_entropy_at_the_masked_positions(teacher_and_heldout):
    teacher, dataset = teacher_and_heldout
    batches = mlm_eval.masked_heldout_batches(dataset, teacher.config.vocab_size, batch_size=3, seed=1)
    losses, hits = [], []
    with torch.no_grad():
        for input_ids, attention_mask, labels in batches:
            assert (input_ids[labels != IGNORE_INDEX] == BERT_SPECIAL_IDS["mask_token"]).all()
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            rows = labels != IGNORE_INDEX
            losses += torch.nn.functional.cross_entropy(logits[rows], labels[rows], reduction="none").tolist()
            hits += (logits[rows].argmax(-1) == labels[rows]).tolist()
    got = mlm_eval.evaluate_mlm(teacher, batches)
    assert got["n_predictions"] == len(losses) > 0
    assert got["mlm_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert got["mlm_accuracy"] == pytest.approx(np.mean(hits))


def test_the_teacher_agrees_with_itself_before_and_after_the_interchange(teacher_and_heldout):
    teacher, dataset = teacher_and_heldout
    variables = deserialize_variable_name("$L:2$H:[0:4]$[0:8]")
    h = mlm_eval.HeldoutMlm(teacher, dataset, variables, variables, seed=5)
    row = h.score(teacher)
    assert row["teacher_agreement"] == 1.0 and row["interchange_accuracy"] == 1.0
    # The interchange changes predictions (else interchange accuracy would only repeat agreement).
    assert not torch.equal(h.teacher_base, h.teacher_interchange)
    other = BertForMaskedLM(teacher.config).eval()
    assert mlm_eval.HeldoutMlm(teacher, dataset, variables, variables, seed=5).score(other)["teacher_agreement"] < 1


def test_unigram_baseline_scores_the_smoothed_corpus_frequencies():
    counts = np.array([50, 0, 3, 1, 0, 0], dtype=np.float64)  # id 0 is special
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1], labels[1, 0], labels[1, 2] = 2, 3, 2
    got = mlm_eval.unigram_baseline(counts, {"pad_token": 0}, [(None, None, labels)])
    p = np.array([0, 1, 4, 2, 1, 1]) / 9
    assert got["top_id"] == 2
    assert got["mlm_loss"] == pytest.approx(-np.mean(np.log(p[[2, 3, 2]])))
    assert got["mlm_accuracy"] == pytest.approx(2 / 3)


# --- statistics over seeds ----------------------------------------------------------------------

LOSS = Metric("mlm_loss", "loss", higher_is_better=False)
ACC = Metric("acc", "accuracy", higher_is_better=True)


def test_paired_comparison_is_a_student_t_interval_on_the_per_seed_differences():
    plain, diito = [6.0, 6.2, 5.9, 6.1], [5.8, 6.25, 5.7, 6.0]
    got = paired_comparison(plain, diito, LOSS)
    d = np.array(diito) - np.array(plain)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert got["difference"]["mean"] == pytest.approx(d.mean())
    assert got["difference"]["ci"] == pytest.approx([lo, hi])
    assert got["plain"]["std"] == pytest.approx(np.std(plain, ddof=1))
    assert got["wins"] == {"diito": 3, "plain": 1, "tie": 0}  # lower loss wins
    assert paired_comparison(plain, diito, ACC)["wins"] == {"diito": 1, "plain": 3, "tie": 0}


def test_one_seed_gives_no_interval_and_no_std():
    got = paired_comparison([6.0], [5.5], LOSS)
    assert got["difference"]["ci"] is None and got["plain"]["std"] is None
    assert got["difference"]["mean"] == -0.5 and got["wins"]["diito"] == 1


def test_matching_multiple_interpolates_between_multiples_or_says_none():
    m = [1.0, 2.0, 4.0]
    assert matching_multiple(m, [0.10, 0.20, 0.30], 0.25, ACC) == pytest.approx(3.0)
    assert matching_multiple(m, [6.0, 5.0, 4.8], 5.5, LOSS) == pytest.approx(1.5)
    assert matching_multiple(m, [0.10, 0.20, 0.30], 0.35, ACC) is None
    assert matching_multiple(m, [0.30, 0.20, 0.10], 0.25, ACC) == 1.0  # no extra data needed
    assert math.isclose(matching_multiple(m, [0.1, 0.2, 0.3], 0.2, ACC), 2.0)


def test_data_multiples_flag_is_checked():
    assert quickstart.parse_multiples("4,2") == [1.0, 2.0, 4.0]
    for bad in ("0.5,2", "two", ""):
        with pytest.raises(UserError, match="--data_multiples"):
            quickstart.parse_multiples(bad)
