"""Classification metrics as pure functions over arrays.

Edge cases are defined, not crashed on: a ratio whose denominator is zero is
NaN, and AUC with a single class present is NaN with a warning.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import roc_auc_score


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """Binary confusion counts with 1 = positive (COVID)."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    return {
        "tp": int(((y_true == 1) & (y_pred == 1)).sum()),
        "fp": int(((y_true == 0) & (y_pred == 1)).sum()),
        "tn": int(((y_true == 0) & (y_pred == 0)).sum()),
        "fn": int(((y_true == 1) & (y_pred == 0)).sum()),
    }


def auc_roc(y_true: np.ndarray, score: np.ndarray) -> float:
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        warnings.warn("AUC is undefined with one class present; returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return float(roc_auc_score(y_true, score))


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float | int]:
    """Accuracy, sensitivity, specificity, precision, F1, AUC and counts at `threshold`.

    `score` is the predicted probability of the positive class.
    """
    y_true = np.asarray(y_true).astype(int)
    score = np.asarray(score, dtype=float)
    counts = confusion(y_true, (score >= threshold).astype(int))
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": int(len(y_true)),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(y_true)),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "auc": auc_roc(y_true, score),
        **counts,
    }
