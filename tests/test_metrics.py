from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from covidscan.evaluate.metrics import binary_metrics


def test_hand_worked_example() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])  # tp=3 fn=1 fp=1 tn=3
    m = binary_metrics(y, p)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["precision"] == 0.75
    assert m["accuracy"] == 0.75 and m["f1"] == 0.75


def test_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))


def test_one_class_gives_nan_auc_with_warning_and_nan_ratios() -> None:
    with pytest.warns(RuntimeWarning, match="one class"):
        m = binary_metrics(np.zeros(4), np.array([0.1, 0.2, 0.7, 0.3]))
    assert math.isnan(m["auc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == 0.75
