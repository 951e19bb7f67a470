"""Evaluation metrics against hand-computed values on fixed predictions."""
from __future__ import annotations

import math

import pytest

from llmkit.finetune.metrics import classification_metrics, confusion_matrix, exact_match, format_metrics, perplexity

REFS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
PREDS = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]


def test_confusion_matrix_counts_reference_rows_and_prediction_columns():
    assert confusion_matrix(PREDS, REFS, 3) == [[3, 1, 0], [0, 1, 1], [1, 0, 3]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([3], [0], 3)


def test_precision_recall_f1_macro_and_micro():
    m = classification_metrics(PREDS, REFS, 3, ["neg", "neu", "pos"])
    # class 0: P = 3/4, R = 3/4; class 1: P = 1/2, R = 1/2; class 2: P = 3/4, R = 3/4
    p = [3 / 4, 1 / 2, 3 / 4]
    f1 = [2 * x * x / (x + x) for x in p]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision_macro"] == pytest.approx(sum(p) / 3)
    assert m["recall_macro"] == pytest.approx(sum(p) / 3)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    for key in ("precision_micro", "recall_micro", "f1_micro"):   # single-label: micro == accuracy
        assert m[key] == pytest.approx(0.7)
    assert m["f1_per_class"]["neu"] == pytest.approx(0.5)
    assert m["confusion_matrix"][2] == [1, 0, 3]


def test_an_unpredicted_class_scores_zero_precision_not_nan():
    m = classification_metrics([0, 0, 0, 0], [0, 0, 1, 1], 2)
    assert m["precision_macro"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall_macro"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_perplexity_is_exp_of_the_token_weighted_mean_nll():
    out = perplexity(nll_sum=30.0, tokens=20)
    assert out["loss"] == pytest.approx(1.5) and out["ppl"] == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_exact_match_compares_the_first_stripped_line():
    assert exact_match([" 19\nmore", "2", "abc "], ["19", "3", "abc"]) == pytest.approx(2 / 3)


def test_format_metrics_writes_a_markdown_table_with_the_confusion_matrix():
    text = format_metrics(classification_metrics(PREDS, REFS, 3, ["a", "b", "c"]), title="dev")
    assert "| accuracy | 0.7000 |" in text and "| a | 3 | 1 | 0 |" in text
