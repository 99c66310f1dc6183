"""Classification metrics computed from logits, so every split is scored the same way.

Implemented on numpy (not scikit-learn calls) so that one pass over logits gives every figure;
the tests check each against scikit-learn on fixed arrays.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (scikit-learn's definition)."""
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the labels seen in y_true or y_pred (scikit-learn's macro average)."""
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al., 2017)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def binary_auroc(scores: np.ndarray, y_true: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic with mid-ranks for ties; nan with one class only."""
    pos = y_true == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):  # assign mid-ranks to runs of equal scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_metrics(logits: np.ndarray, y_true: np.ndarray, num_classes: int) -> dict[str, float]:
    """Every metric lnshift reports for one split; AUROC only for binary tasks."""
    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true)
    probs = softmax(logits)
    y_pred = probs.argmax(axis=1)
    out = {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "ece": expected_calibration_error(probs, y_true),
        "n": len(y_true),
    }
    if num_classes == 2:
        out["auroc"] = binary_auroc(probs[:, 1], y_true)
    return out
