"""Metrics against scikit-learn on fixed arrays (including ties and an absent class)."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from lnshift.training.metrics import classification_metrics, expected_calibration_error

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(200, 4))
Y = RNG.integers(0, 4, size=200)
Y[:10] = 3  # make sure every class is present


def test_accuracy_balanced_and_f1_match_sklearn():
    pred = LOGITS.argmax(1)
    m = classification_metrics(LOGITS, Y, 4)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(Y, pred, average="macro"))
    assert m["n"] == 200
    assert "auroc" not in m


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the reference call below
def test_f1_with_a_class_never_predicted_and_one_never_true():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class predicted but never true is expected, not warned about
        m = classification_metrics(np.eye(4)[pred] * 5, y, 4)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # recall over the true classes only


def test_auroc_matches_sklearn_with_ties():
    scores = np.round(RNG.random(300), 1)  # many ties
    y = RNG.integers(0, 2, size=300)
    m = classification_metrics(np.stack([-scores, scores], 1), y, 2)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, scores))


def test_auroc_single_class_is_nan():
    assert np.isnan(classification_metrics(np.array([[0.0, 0.1], [0.0, 0.9]]), np.array([1, 1]), 2)["auroc"])


def test_empty_split_is_nan_not_an_error():
    m = classification_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int), 2)
    assert m["n"] == 0 and all(np.isnan(m[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"))


def test_ece_by_hand():
    # two bins used: confidences 0.95 (both correct) and 0.55 (one of two correct)
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 0, 0, 0])
    expected = 0.5 * abs(1.0 - 0.95) + 0.5 * abs(0.5 - 0.55)
    assert expected_calibration_error(probs, y) == pytest.approx(expected)


def test_perfect_confident_predictions_have_zero_ece():
    y = np.arange(5) % 3
    logits = np.eye(3)[y] * 100
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == 1.0 and m["ece"] == pytest.approx(0.0, abs=1e-9)
