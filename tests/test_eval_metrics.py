"""Each metric of eval_metrics.py against values worked out by hand."""

import math

import pytest

import eval_metrics

# A binary confusion matrix: TP=3, FN=1, FP=2, TN=4.
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]


def test_accuracy_f1_and_mcc_match_the_confusion_matrix():
    mrpc = eval_metrics.glue_metrics("mrpc", PREDS, LABELS)
    assert mrpc["accuracy"] == pytest.approx(7 / 10)
    precision, recall = 3 / 5, 3 / 4
    assert mrpc["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # 2/3
    assert mrpc["combined_score"] == pytest.approx((0.7 + 2 / 3) / 2)
    cola = eval_metrics.glue_metrics("cola", PREDS, LABELS)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    assert cola == {"matthews_correlation": pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))}


def test_single_metric_tasks_report_accuracy_only():
    for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert eval_metrics.glue_metrics(task, PREDS, LABELS) == {"accuracy": pytest.approx(0.7)}
    assert set(eval_metrics.glue_metrics("qqp", PREDS, LABELS)) == {"accuracy", "f1", "combined_score"}


def test_stsb_reports_pearson_and_spearman():
    # x = 1..4, y = x^2: same ranks (Spearman 1); Pearson = 25 / sqrt(5 * 129).
    result = eval_metrics.glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert result["spearmanr"] == pytest.approx(1.0)
    assert result["pearson"] == pytest.approx(25 / math.sqrt(645))
    # deviations (-1, 0, 1) and (-1, 1, 0): covariance 1, variances 2 and 2 -> 0.5, ranks alike.
    result = eval_metrics.glue_metrics(None, [1.0, 2.0, 3.0], [1.0, 3.0, 2.0], is_regression=True)
    assert result["pearson"] == pytest.approx(0.5) and result["spearmanr"] == pytest.approx(0.5)


def test_custom_classification_data_reports_accuracy():
    assert eval_metrics.glue_metrics(None, [0, 2, 1, 1], [0, 2, 2, 1]) == {"accuracy": 0.75}


def test_squad_normalisation_drops_case_punctuation_articles_and_spaces():
    assert eval_metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert eval_metrics.normalize_answer("An apple a day") == "apple day"
    assert eval_metrics.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert eval_metrics.exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert eval_metrics.exact_match("Eiffel", "Eiffel tower") == 0.0


def test_token_f1_counts_shared_normalised_tokens():
    # "cat sat on mat" vs "cat on mat": 3 shared, precision 3/4, recall 1.
    assert eval_metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert eval_metrics.token_f1("dog", "cat") == 0.0
    assert eval_metrics.token_f1("", "") == 1.0
    assert eval_metrics.token_f1("", "cat") == 0.0


def test_squad_scores_each_question_against_its_best_gold_answer():
    predictions = {"q1": "paris france", "q2": "Cat"}
    references = {"q1": ["paris", "in paris france"], "q2": ["the cat"]}
    # q1: EM 0; F1 max(2/3 vs "paris", 0.8 vs "in paris france") = 0.8. q2: EM 1, F1 1.
    result = eval_metrics.squad_metrics(predictions, references)
    assert result == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(90.0)}


def test_squad_v2_splits_answerable_and_unanswerable_questions():
    references = {"a": ["paris"], "b": []}
    right = eval_metrics.squad_v2_metrics({"a": "paris", "b": ""}, references)
    assert right["exact"] == right["f1"] == 100.0
    assert right["HasAns_exact"] == right["NoAns_exact"] == 100.0
    assert right["HasAns_total"] == right["NoAns_total"] == 1 and right["total"] == 2
    wrong = eval_metrics.squad_v2_metrics({"a": "", "b": "london"}, references)
    assert wrong["exact"] == wrong["HasAns_f1"] == wrong["NoAns_f1"] == 0.0


def test_squad_v2_no_answer_threshold_and_best_threshold():
    references = {"a": ["paris"], "b": []}
    predictions = {"a": "paris", "b": "london"}
    probs = {"a": 0.2, "b": 3.0}
    # b's no-answer score 3.0 exceeds the threshold 1.0: it counts as "" and is right.
    result = eval_metrics.squad_v2_metrics(predictions, references, probs, no_answer_threshold=1.0)
    assert result["exact"] == 100.0 and result["NoAns_exact"] == 100.0
    # Answering only a (threshold 0.2) gets both right; answering b too would lose it.
    assert result["best_exact"] == 100.0 and result["best_exact_thresh"] == pytest.approx(0.2)
    assert eval_metrics.squad_v2_metrics(predictions, references, probs, no_answer_threshold=5.0)["exact"] == 50.0


def test_seqeval_scores_whole_entities():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    missed_loc = eval_metrics.ner_metrics([["B-PER", "I-PER", "O", "O"]], gold)
    # Gold entities PER(0-1), LOC(3); predicted PER(0-1): precision 1, recall 1/2.
    assert missed_loc == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "accuracy": 0.75,
    }
    # A PER span cut short is a wrong entity, although 3 of 4 tags match.
    short_per = eval_metrics.ner_metrics([["B-PER", "O", "O", "B-LOC"]], gold, entity_level=True)
    assert short_per["precision"] == short_per["recall"] == short_per["f1"] == 0.5
    assert short_per["accuracy"] == 0.75
    assert short_per["PER_f1"] == 0.0 and short_per["LOC_f1"] == 1.0 and short_per["PER_number"] == 1


def test_mlm_accuracy_counts_masked_positions_only():
    preds = [[1, 2, 3], [4, 5, 6]]
    labels = [[1, -100, 0], [-100, 5, -100]]
    assert eval_metrics.mlm_accuracy(preds, labels) == pytest.approx(2 / 3)
    assert eval_metrics.mlm_accuracy(preds, [[-100] * 3] * 2) == 0.0


def test_perplexity_is_exp_of_the_loss():
    assert eval_metrics.perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert eval_metrics.perplexity(1e6) == math.inf
