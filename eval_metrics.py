"""Evaluation metrics for the fine-tuning scripts, as pure functions computed locally.

    python -c "import eval_metrics; print(eval_metrics.glue_metrics('mrpc', [1, 0, 1], [1, 1, 1]))"

GLUE (scikit-learn / scipy), CoNLL-style NER (seqeval), SQuAD v1.1 / v2.0 exact match and F1
(the official answer normalisation), and masked-LM accuracy / perplexity. Nothing is downloaded:
the scripts used to fetch these through `datasets.load_metric`, which needs the network.

Scores are fractions in [0, 1] (correlations in [-1, 1]) except the SQuAD ones, which are
percentages like the official SQuAD scripts print them.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# Which metrics each GLUE task reports (the GLUE benchmark's own choice).
GLUE_TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def _pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(pearsonr(preds, labels)[0])


def _spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(spearmanr(preds, labels)[0])


_METRIC_FNS = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p)),
    "matthews_correlation": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def glue_metrics(task_name: str | None, preds: Sequence, labels: Sequence, is_regression: bool = False) -> dict:
    """GLUE scores of `preds` against `labels`, both 1-D: class ids, or floats for STS-B / regression.

    `task_name` None (a custom data set) gives accuracy, or Pearson/Spearman when `is_regression`.
    Tasks with two metrics also get `combined_score`, their mean.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if task_name is None:
        names = ("pearson", "spearmanr") if is_regression else ("accuracy",)
    else:
        names = GLUE_TASK_METRICS[task_name]
    result = {name: _METRIC_FNS[name](preds, labels) for name in names}
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def ner_metrics(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], entity_level: bool = False
) -> dict:
    """seqeval scores of tag sequences (e.g. `[["B-PER", "I-PER", "O"], ...]`), one list per sentence.

    precision / recall / f1 are entity-level micro averages (an entity counts only when its type
    and its span match exactly); accuracy is per token. `entity_level` adds `<TYPE>_precision`,
    `<TYPE>_recall`, `<TYPE>_f1` and `<TYPE>_number` for each entity type.
    """
    from seqeval.metrics import accuracy_score as tag_accuracy
    from seqeval.metrics import classification_report, precision_score, recall_score
    from seqeval.metrics import f1_score as ent_f1

    predictions, references = [list(p) for p in predictions], [list(r) for r in references]
    result = {
        "precision": float(precision_score(references, predictions, zero_division=0)),
        "recall": float(recall_score(references, predictions, zero_division=0)),
        "f1": float(ent_f1(references, predictions, zero_division=0)),
        "accuracy": float(tag_accuracy(references, predictions)),
    }
    if entity_level:
        report = classification_report(references, predictions, output_dict=True, zero_division=0)
        for entity, scores in report.items():
            if entity.endswith("avg"):
                continue
            result[f"{entity}_precision"] = float(scores["precision"])
            result[f"{entity}_recall"] = float(scores["recall"])
            result[f"{entity}_f1"] = float(scores["f1-score"])
            result[f"{entity}_number"] = int(scores["support"])
    return result


# ----------------------------------------------------------------------------------------------
# SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between the normalised strings; two empty answers (no-answer) score 1."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_over_golds(fn, prediction: str, golds: Sequence[str]) -> float:
    # A question without gold answers (SQuAD v2 "impossible") is answered correctly by "".
    return max(fn(prediction, gold) for gold in (golds or [""]))


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """SQuAD v1.1 `exact_match` and `f1` in percent; each question scores its best gold answer.

    predictions: question id -> predicted text. references: question id -> gold answer texts.
    """
    _check_ids(predictions, references)
    em = [_best_over_golds(exact_match, predictions[q], golds) for q, golds in references.items()]
    f1 = [_best_over_golds(token_f1, predictions[q], golds) for q, golds in references.items()]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def squad_v2_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    no_answer_probs: Mapping[str, float] | None = None,
    no_answer_threshold: float = 1.0,
) -> dict:
    """SQuAD v2.0 scores in percent: overall, HasAns_* (answerable) and NoAns_* (no gold answer).

    A question with an empty gold list is unanswerable; predicting "" is the null answer.
    `no_answer_probs` (question id -> a no-answer score, higher meaning "no answer") turns a
    prediction into "" when its score exceeds `no_answer_threshold`, as in the official script,
    and adds `best_exact` / `best_f1` with the threshold that reaches them.
    """
    _check_ids(predictions, references)
    qids = list(references)
    has_answer = {q: bool(references[q]) for q in qids}
    raw_em = {q: _best_over_golds(exact_match, predictions[q], references[q]) for q in qids}
    raw_f1 = {q: _best_over_golds(token_f1, predictions[q], references[q]) for q in qids}
    em, f1 = dict(raw_em), dict(raw_f1)
    if no_answer_probs is not None:
        for q in qids:
            if no_answer_probs[q] > no_answer_threshold:
                em[q] = f1[q] = float(not has_answer[q])

    def summary(prefix: str, subset: list[str]) -> dict:
        out = {f"{prefix}total": len(subset)}
        if subset:
            out[f"{prefix}exact"] = 100.0 * float(np.mean([em[q] for q in subset]))
            out[f"{prefix}f1"] = 100.0 * float(np.mean([f1[q] for q in subset]))
        return out

    result = summary("", qids)
    result.update(summary("HasAns_", [q for q in qids if has_answer[q]]))
    result.update(summary("NoAns_", [q for q in qids if not has_answer[q]]))
    if no_answer_probs is not None:
        for name, scores in (("exact", raw_em), ("f1", raw_f1)):
            best, thresh = _best_no_answer_threshold(predictions, scores, no_answer_probs, has_answer)
            result[f"best_{name}"], result[f"best_{name}_thresh"] = best, thresh
    return result


def _best_no_answer_threshold(predictions, scores, no_answer_probs, has_answer) -> tuple[float, float]:
    """Best score (percent) over thresholds on `no_answer_probs`, and the threshold reaching it.

    Start from "every question answered null" (each unanswerable question scores 1), then answer
    questions one by one in increasing no-answer score and keep the best running total.
    """
    current = best = float(sum(not h for h in has_answer.values()))
    best_thresh = 0.0
    for q in sorted(has_answer, key=lambda q: no_answer_probs[q]):
        if has_answer[q]:
            current += scores[q]
        elif predictions[q]:
            current -= 1
        if current > best:
            best, best_thresh = current, float(no_answer_probs[q])
    return 100.0 * best / len(has_answer), best_thresh


def _check_ids(predictions: Mapping, references: Mapping) -> None:
    missing = [q for q in references if q not in predictions]
    assert not missing, f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}"


# ----------------------------------------------------------------------------------------------
# Masked language modelling


def mlm_accuracy(preds: np.ndarray, labels: np.ndarray, ignore_index: int = -100) -> float:
    """Share of masked positions whose arg-max prediction is the original token.

    preds, labels: (n_sequences, seq_len) token ids; labels are `ignore_index` where not masked.
    """
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    keep = labels != ignore_index
    return float((preds[keep] == labels[keep]).mean()) if keep.any() else 0.0


def perplexity(mean_loss: float) -> float:
    """exp of the mean cross-entropy (nats per masked token); inf when that overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
