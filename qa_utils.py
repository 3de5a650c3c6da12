"""Extractive question answering helpers: SQuAD files and logits-to-answer post-processing.

    python run_qa.py --model_name_or_path ./dump --tokenizer_name bert-base-uncased \
        --validation_file dev-v1.1.json --do_eval --output_dir ./qa_results

`run_qa.py` cuts each (question, context) example into overlapping features; the model scores
every token as the answer's start and end. `postprocess_qa_predictions` maps those scores back
to text spans of the original context through the tokenizer's character offsets.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def read_squad_json(path: str | Path) -> list[dict] | None:
    """Rows (id, title, context, question, answers) of an official SQuAD file, or None.

    The official files nest articles > paragraphs > questions under a top-level "data" key; a
    file of one example per row (JSON list or JSON lines) is not that format and gives None.
    A file with a top-level "data" list that does not follow the nesting raises a ValueError
    naming the first place that does not (e.g. `data[0].paragraphs[2] has no 'qas'`).
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError:
        return None  # JSON lines
    if not (isinstance(doc, dict) and isinstance(doc.get("data"), list)):
        return None

    def get(obj: Any, key: str, kind: type, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{where} has no '{key}' (expected the SQuAD layout: data > paragraphs > qas)")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise ValueError(f"{where}.{key} must be a {kind.__name__}, found {type(obj[key]).__name__}")
        return obj[key]

    rows = []
    for a, article in enumerate(doc["data"]):
        for p, paragraph in enumerate(get(article, "paragraphs", list, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = get(paragraph, "context", str, where)
            for q, qa in enumerate(get(paragraph, "qas", list, where)):
                where_q = f"{where}.qas[{q}]"
                qid = qa.get("id") if isinstance(qa, dict) else None
                answers = get(qa, "answers", list, where_q) if isinstance(qa, dict) and "answers" in qa else []
                rows.append(
                    {
                        "id": qid if isinstance(qid, str) else get(qa, "id", str, where_q),
                        "title": str(article.get("title", "")),
                        "context": context,
                        "question": get(qa, "question", str, where_q),
                        "answers": {
                            "text": [get(x, "text", str, f"{where_q}.answers[{i}]") for i, x in enumerate(answers)],
                            "answer_start": [
                                get(x, "answer_start", int, f"{where_q}.answers[{i}]") for i, x in enumerate(answers)
                            ],
                        },
                    }
                )
    return rows


def answer_mismatch(row: dict) -> str | None:
    """Why a row's answers do not sit in its context at their `answer_start`, or None if they do."""
    answers, context = row["answers"], row["context"]
    if len(answers["text"]) != len(answers["answer_start"]):
        return f"{len(answers['text'])} answer texts but {len(answers['answer_start'])} answer_start values"
    for text, start in zip(answers["text"], answers["answer_start"], strict=False):
        if context[start : start + len(text)] != text or start < 0:
            return f"answer {text!r} is not at character {start} of its context"
    return None


def postprocess_qa_predictions(
    examples: Sequence[dict],
    features: Sequence[dict],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Turn per-feature start/end logits into one answer text per example.

    examples: rows with "id" and "context". features: rows with "example_id" and
    "offset_mapping" (one (char_start, char_end) per token, None outside the context).
    start_logits, end_logits: (n_features, seq_len); columns past a feature's length are padding.

    For each example, the `n_best_size` best starts and ends of each of its features are paired
    into spans of at most `max_answer_length` tokens, scored start + end logit. With
    `version_2_with_negative`, the null answer ("") scores the lowest CLS (position 0) start + end
    over the features, and is chosen when null_score - best_span_score > null_score_diff_threshold.

    Returns (predictions: id -> text, n-best: id -> ranked candidates with probabilities,
    null score differences: id -> null_score - best_span_score, empty without v2).
    """
    assert len(features) == len(start_logits) == len(end_logits), "one row of logits per feature"
    features_of = collections.defaultdict(list)
    for i, feature in enumerate(features):
        features_of[feature["example_id"]].append(i)

    predictions, nbest_json, null_diffs = {}, {}, {}
    for example in examples:
        context = example["context"]
        candidates, null_score = [], None
        for i in features_of[example["id"]]:
            starts, ends, offsets = start_logits[i], end_logits[i], features[i]["offset_mapping"]
            cls_score = float(starts[0] + ends[0])
            if null_score is None or cls_score < null_score:
                null_score = cls_score
            top_starts = np.argsort(starts)[::-1][:n_best_size]
            top_ends = np.argsort(ends)[::-1][:n_best_size]
            for s in top_starts:
                for e in top_ends:
                    if (
                        s >= len(offsets)
                        or e >= len(offsets)
                        or offsets[s] is None
                        or offsets[e] is None
                        or e < s
                        or e - s + 1 > max_answer_length
                    ):
                        continue
                    char_start, char_end = offsets[s][0], offsets[e][1]
                    candidates.append(
                        {
                            "text": context[char_start:char_end],
                            "offsets": (int(char_start), int(char_end)),
                            "score": float(starts[s] + ends[e]),
                            "start_logit": float(starts[s]),
                            "end_logit": float(ends[e]),
                        }
                    )
        candidates = sorted(candidates, key=lambda c: c["score"], reverse=True)[:n_best_size]
        best_span = candidates[0] if candidates else None
        if version_2_with_negative and null_score is not None:
            candidates.append(
                {
                    "text": "",
                    "offsets": (0, 0),
                    "score": null_score,
                    "start_logit": null_score / 2,
                    "end_logit": null_score / 2,
                }
            )
            candidates.sort(key=lambda c: c["score"], reverse=True)
        if not candidates:
            candidates = [{"text": "", "offsets": (0, 0), "score": 0.0, "start_logit": 0.0, "end_logit": 0.0}]

        scores = np.array([c["score"] for c in candidates])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        nbest_json[example["id"]] = [
            {
                "text": c["text"],
                "probability": float(p),
                "start_logit": c["start_logit"],
                "end_logit": c["end_logit"],
                "offsets": list(c["offsets"]),
            }
            for c, p in zip(candidates, probs, strict=False)
        ]

        if not version_2_with_negative:
            predictions[example["id"]] = candidates[0]["text"]
            continue
        best_score = best_span["score"] if best_span is not None else -np.inf
        diff = null_score - best_score if null_score is not None else np.inf
        null_diffs[example["id"]] = float(diff)
        predictions[example["id"]] = "" if diff > null_score_diff_threshold else best_span["text"]
    return predictions, nbest_json, null_diffs
