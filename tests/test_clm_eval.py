"""clm_eval.py: held-out causal-LM scores equal direct computations on tiny random Llama models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_decoder_config

import clm_eval
from architectures import backbone
from lm_seqs_dataset import DatasetParams, LmSeqsDataset
from losses import IGNORE_INDEX
from neuron_mapping import deserialize_variable_name

VOCAB = 60
SPECIAL = dict(unk_token=0, bos_token=1, eos_token=2, pad_token=3)
VARIABLES = deserialize_variable_name("$L:1$H:[0:4]$[0:8]")  # block 1's whole output (hidden 32)


def tiny_llama(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_decoder_config("llama", vocab=VOCAB, layers=3)).eval()


@pytest.fixture(scope="module")
def dataset() -> LmSeqsDataset:
    rng = np.random.default_rng(0)
    seqs = [np.array([1, *rng.integers(4, VOCAB, size=n), 2], dtype=np.uint16) for n in (14, 20, 11, 25, 17, 30, 12)]
    return LmSeqsDataset(DatasetParams(64, False, SPECIAL, seed=3, family="llama"), seqs)


def test_perplexity_is_exp_of_the_mean_next_token_nll_of_each_sequence(dataset):
    model = tiny_llama(0)
    batches = clm_eval.heldout_batches(dataset, batch_size=3, seed=0, interchange_prop=0.3)
    run = clm_eval.model_predictions(model, batches, None)
    nll, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for i in range(len(dataset)):  # one unpadded sequence at a time, through the stock forward
            ids = torch.as_tensor(dataset.sequence(i))[None]
            logits = model(ids).logits[0, :-1]
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            correct += int((logits.argmax(-1) == ids[0, 1:]).sum())
            n += ids.size(1) - 1
    scores = clm_eval.HeldoutClm.lm_scores(run, n)
    assert scores["n_predictions"] == n == sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches)
    assert scores["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert scores["accuracy"] == correct / n


def test_scored_positions_are_after_the_span_and_have_a_next_token(dataset):
    for b in clm_eval.heldout_batches(dataset, batch_size=4, seed=1, interchange_prop=0.3):
        for row in range(b.input_ids.size(0)):
            span = b.interchange_mask[row].nonzero().flatten()
            assert len(span) and torch.equal(span, torch.arange(int(span[0]), int(span[-1]) + 1))  # one span
            scored = b.after_span[row].nonzero().flatten()
            has_next = (b.targets[row] != IGNORE_INDEX).nonzero().flatten()
            assert torch.equal(scored, has_next[has_next > span[-1]])


def test_interchange_accuracy_compares_with_a_hand_made_interchange(dataset):
    teacher, student = tiny_llama(0), tiny_llama(1)
    heldout = clm_eval.HeldoutClm(teacher, dataset, VARIABLES, VARIABLES, seed=2, batch_size=4)
    agree, total = 0, 0
    with torch.no_grad():
        for b in heldout.batches:
            tops = []
            for model in (teacher, student):
                # A full counterfactual forward with a hand-written hook on block 1's output.
                source = backbone(model)(input_ids=b.dual_input_ids, output_hidden_states=True).hidden_states[2]
                rows, pos = b.interchange_mask.nonzero(as_tuple=True)
                values = source[b.dual_interchange_mask]

                def write(module, args, output, values=values, rows=rows, pos=pos):
                    hidden = output[0] if isinstance(output, tuple) else output
                    hidden = hidden.clone()
                    hidden[rows, pos] = values
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

                handle = model.model.layers[1].register_forward_hook(write)
                try:
                    logits = model(b.input_ids).logits
                finally:
                    handle.remove()
                tops.append(logits[b.after_span].argmax(-1))
            agree += int((tops[0] == tops[1]).sum())
            total += len(tops[0])
    row = heldout.score(student)
    assert total == heldout.n_interchange_positions > 0
    assert row["interchange_accuracy"] == agree / total


def test_a_student_equal_to_its_teacher_agrees_everywhere(dataset):
    teacher = tiny_llama(0)
    heldout = clm_eval.HeldoutClm(teacher, dataset, VARIABLES, VARIABLES, seed=2, batch_size=4)
    row = heldout.score(tiny_llama(0))
    assert row["teacher_agreement"] == 1.0 and row["interchange_accuracy"] == 1.0
    assert row["perplexity"] == pytest.approx(heldout.teacher_scores()["perplexity"])
    other = heldout.score(tiny_llama(5))
    assert other["teacher_agreement"] < 1.0


def test_unigram_baseline_scores_the_corpus_frequencies(dataset):
    batches = clm_eval.heldout_batches(dataset, batch_size=4, seed=0, interchange_prop=0.3)
    counts = np.zeros(VOCAB, dtype=np.int64)
    counts[7], counts[1] = 1000, 5000  # the start token is frequent but never a target
    u = clm_eval.unigram_baseline(counts, 1, batches)
    targets = torch.cat([b.targets[b.targets != IGNORE_INDEX] for b in batches])
    p = np.ones(VOCAB)
    p[7], p[1] = 1001, 0
    p /= p.sum()
    assert u["top_id"] == 7 and u["accuracy"] == float((targets == 7).float().mean())
    assert u["nll"] == pytest.approx(float(-np.log(p[targets.numpy()]).mean()))
    assert u["perplexity"] == pytest.approx(math.exp(u["nll"]))
