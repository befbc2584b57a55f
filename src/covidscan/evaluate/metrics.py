"""Classification metrics as pure functions over arrays.

Edge cases are defined, not crashed on: a ratio whose denominator is zero is
NaN, and AUC with a single class present is NaN with a warning.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, cohen_kappa_score, matthews_corrcoef, roc_auc_score


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


def auc_pr(y_true: np.ndarray, score: np.ndarray) -> float:
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return math.nan
    return float(average_precision_score(y_true, score))


def expected_calibration_error(y_true: np.ndarray, score: np.ndarray, bins: int = 10) -> float:
    """ECE: bin-size-weighted mean |observed positive rate - mean predicted probability| over equal-width bins."""
    y_true, score = np.asarray(y_true).astype(float), np.asarray(score, dtype=float)
    if len(y_true) == 0:
        return math.nan
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(y_true[mask].mean() - score[mask].mean())
    return float(total)


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float | int]:
    """The seed table's metrics and more, at `threshold`; NaN where undefined.

    `score` is the predicted probability of the positive class.
    """
    y_true = np.asarray(y_true).astype(int)
    score = np.asarray(score, dtype=float)
    counts = confusion(y_true, (score >= threshold).astype(int))
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    specificity = _ratio(tn, tn + fp)
    pred = (score >= threshold).astype(int)
    both = len(np.unique(y_true)) > 1 or len(np.unique(pred)) > 1
    return {
        "n": int(len(y_true)),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(y_true)),
        "balanced_accuracy": (sensitivity + specificity) / 2 if not (math.isnan(sensitivity) or math.isnan(specificity)) else math.nan,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "npv": _ratio(tn, tn + fn),
        "f1": f1,
        "fpr": _ratio(fp, fp + tn),
        "fnr": _ratio(fn, fn + tp),
        "fdr": _ratio(fp, fp + tp),
        "auc": auc_roc(y_true, score),
        "auc_pr": auc_pr(y_true, score),
        "mcc": float(matthews_corrcoef(y_true, pred)) if both else math.nan,
        "kappa": float(cohen_kappa_score(y_true, pred)) if both else math.nan,
        "brier": float(np.mean((score - y_true) ** 2)) if len(y_true) else math.nan,
        "ece": expected_calibration_error(y_true, score),
        **counts,
    }
