"""Classification metrics as pure functions over arrays.

Edge cases are defined, not crashed on: a ratio whose denominator is zero is
NaN, and AUC with a single class present is NaN with a warning.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import cohen_kappa_score, matthews_corrcoef


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
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties; equals scikit-learn's)."""
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        warnings.warn("AUC is undefined with one class present; returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    ranks = rankdata(np.asarray(score, float))
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_pr(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve, as scikit-learn defines it)."""
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        warnings.warn("AUC-PR is undefined with one class present; returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    order = np.argsort(-np.asarray(score, float), kind="stable")
    ranked_score, ranked_y = np.asarray(score, float)[order], y_true[order]
    last_of_each_threshold = np.r_[np.flatnonzero(np.diff(ranked_score)), len(ranked_y) - 1]
    tps = np.cumsum(ranked_y)[last_of_each_threshold]
    fps = (last_of_each_threshold + 1) - tps
    precision, recall = tps / (tps + fps), tps / ranked_y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _mcc(tp: int, fp: int, tn: int, fn: int) -> float:
    denominator = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0  # scikit-learn's convention


def _kappa(tp: int, fp: int, tn: int, fn: int) -> float:
    n = tp + fp + tn + fn
    observed = (tp + tn) / n
    expected = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    return float((observed - expected) / (1 - expected)) if expected != 1 else math.nan


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
        "mcc": _mcc(tp, fp, tn, fn) if both else math.nan,
        "kappa": _kappa(tp, fp, tn, fn) if both else math.nan,
        "brier": float(np.mean((score - y_true) ** 2)) if len(y_true) else math.nan,
        "ece": expected_calibration_error(y_true, score),
        **counts,
    }


MULTICLASS_AVERAGED = ("precision", "sensitivity", "specificity", "f1", "auc")


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, object]:
    """One-vs-rest binary metrics per class (argmax decision), with macro and support-weighted means."""
    y_true, probs = np.asarray(y_true).astype(int), np.asarray(probs, float)
    pred = probs.argmax(1)
    per_class: dict[str, dict[str, float | int]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for index, name in enumerate(classes):
            # Thresholding at 0.5 is not the argmax rule, so the counts come from the argmax decision.
            row = binary_metrics(y_true == index, probs[:, index])
            row.update(confusion(y_true == index, pred == index))
            tp, fp, tn, fn = row["tp"], row["fp"], row["tn"], row["fn"]
            row.update(precision=_ratio(tp, tp + fp), sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
                       f1=_ratio(2 * tp, 2 * tp + fp + fn))
            per_class[name] = row
    support = np.array([(y_true == i).sum() for i in range(len(classes))], float)
    out: dict[str, object] = {
        "n": int(len(y_true)),
        "accuracy": _ratio(int((pred == y_true).sum()), len(y_true)),
        "kappa": float(cohen_kappa_score(y_true, pred)) if len(y_true) else math.nan,
        "mcc": float(matthews_corrcoef(y_true, pred)) if len(y_true) else math.nan,
        "per_class": per_class,
    }
    for name in MULTICLASS_AVERAGED:
        values = np.array([float(per_class[c][name]) for c in classes])
        finite = ~np.isnan(values)
        out[f"macro_{name}"] = float(values[finite].mean()) if finite.any() else math.nan
        weights = support[finite]
        out[f"weighted_{name}"] = float((values[finite] * weights).sum() / weights.sum()) if weights.sum() else math.nan
    return out
