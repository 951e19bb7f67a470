"""Evaluation metrics: classification scores, perplexity and exact match.

With C[i, j] = #(reference i, prediction j) (the confusion matrix), per class k:
    precision_k = C[k, k] / sum_i C[i, k]     recall_k = C[k, k] / sum_j C[k, j]
    F1_k = 2 P_k R_k / (P_k + R_k)           (0 where undefined, as scikit-learn's zero_division=0)
Macro averages are the unweighted means over the classes that occur in the references or the
predictions; micro averages pool the counts: for single-label classification micro P = R = F1 =
accuracy (Sokolova & Lapalme, 2009, "A systematic analysis of performance measures for
classification tasks"). Perplexity is exp of the mean token negative log-likelihood
(token-weighted over the whole set, not a mean of per-batch perplexities). Exact match compares
the first line of each stripped generation with the answer (`llmkit.data.synthetic.exact_match`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ..data.synthetic import exact_match

__all__ = ["confusion_matrix", "classification_metrics", "perplexity", "exact_match", "format_metrics"]


def confusion_matrix(predictions: Sequence[int], references: Sequence[int], n_labels: int) -> list[list[int]]:
    """C[i][j] = how many examples of reference class i were predicted as j."""
    if len(predictions) != len(references):
        raise ValueError(f"confusion_matrix: {len(predictions)} predictions for {len(references)} references")
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for p, r in zip(predictions, references):
        if not (0 <= p < n_labels and 0 <= r < n_labels):
            raise ValueError(f"confusion_matrix: label {(r, p)} outside [0, {n_labels})")
        matrix[r][p] += 1
    return matrix


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def classification_metrics(predictions: Sequence[int], references: Sequence[int], n_labels: int,
                           names: Optional[Sequence[str]] = None) -> dict:
    """accuracy, precision/recall/F1 (macro and micro), per-class F1 and the confusion matrix."""
    if not references:
        raise ValueError("classification_metrics: no examples to score")
    C = confusion_matrix(predictions, references, n_labels)
    tp = [C[k][k] for k in range(n_labels)]
    predicted = [sum(C[i][k] for i in range(n_labels)) for k in range(n_labels)]
    actual = [sum(C[k]) for k in range(n_labels)]
    present = [k for k in range(n_labels) if predicted[k] or actual[k]]
    precision = [_ratio(tp[k], predicted[k]) for k in range(n_labels)]
    recall = [_ratio(tp[k], actual[k]) for k in range(n_labels)]
    f1 = [_ratio(2 * precision[k] * recall[k], precision[k] + recall[k]) for k in range(n_labels)]
    micro_p = _ratio(sum(tp), sum(predicted))
    micro_r = _ratio(sum(tp), sum(actual))
    names = list(names) if names is not None else [str(k) for k in range(n_labels)]
    return {
        "accuracy": sum(tp) / len(references),
        "precision_macro": sum(precision[k] for k in present) / len(present),
        "recall_macro": sum(recall[k] for k in present) / len(present),
        "f1_macro": sum(f1[k] for k in present) / len(present),
        "precision_micro": micro_p,
        "recall_micro": micro_r,
        "f1_micro": _ratio(2 * micro_p * micro_r, micro_p + micro_r),
        "f1_per_class": {names[k]: f1[k] for k in range(n_labels)},
        "confusion_matrix": C,
        "labels": names,
        "examples": len(references),
    }


def perplexity(nll_sum: float, tokens: int) -> dict:
    """{"loss": mean NLL per token, "ppl": exp(loss)} from a summed NLL over `tokens` tokens."""
    if tokens <= 0:
        raise ValueError("perplexity: no scored tokens")
    loss = nll_sum / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": tokens}


def format_metrics(metrics: dict, title: str = "") -> str:
    """A markdown table of the scalar metrics, then the confusion matrix when there is one."""
    lines = ([f"### {title}", ""] if title else []) + ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.4f} |")
        elif isinstance(value, int) and not isinstance(value, bool):
            lines.append(f"| {key} | {value} |")
    C, names = metrics.get("confusion_matrix"), metrics.get("labels")
    if C and names and len(names) <= 20:
        lines += ["", "confusion matrix (rows: reference, columns: prediction)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(C)]
    return "\n".join(lines)
