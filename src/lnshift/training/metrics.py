"""Classification metrics computed from logits, so every split is scored the same way.

scikit-learn computes accuracy, balanced accuracy, macro-F1 and AUROC; ECE is ours (scikit-learn has
none). A figure that is undefined (an empty split, AUROC with one class) is NaN, not an error.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import softmax
from sklearn import metrics as skm

ECE_BINS = 15


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


def classification_metrics(logits: np.ndarray, y_true: np.ndarray, num_classes: int) -> dict[str, float]:
    """Every metric lnshift reports for one split; AUROC only for binary tasks.

    Balanced accuracy is the mean recall over the classes present in y_true, macro-F1 the unweighted
    mean over the labels in y_true or y_pred (scikit-learn's definitions).
    """
    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true)
    probs = softmax(logits, axis=1)
    y_pred = probs.argmax(axis=1)
    nan = float("nan")
    out = {"accuracy": nan, "balanced_accuracy": nan, "macro_f1": nan}
    if len(y_true):
        with warnings.catch_warnings():  # its remarks on classes missing from y_true or y_pred: no fault here
            warnings.simplefilter("ignore", UserWarning)
            out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, y_pred))
        out["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
        out["macro_f1"] = float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    out.update(ece=expected_calibration_error(probs, y_true), n=len(y_true))
    if num_classes == 2:
        out["auroc"] = float(skm.roc_auc_score(y_true, probs[:, 1])) if len(np.unique(y_true)) == 2 else nan
    return out
