"""ROC, precision-recall and reliability curves as plain numbers, stored in metrics.json.

The report draws its figures from these numbers, so every plotted point can
be checked against metrics.json.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

MAX_POINTS = 200


def _thin(*columns: np.ndarray) -> list[list[float]]:
    """At most MAX_POINTS evenly spaced points, first and last kept."""
    n = len(columns[0])
    keep = np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int)) if n else np.array([], int)
    return [[round(float(c[i]), 5) for c in columns] for i in keep]


def roc_points(y_true: np.ndarray, score: np.ndarray) -> list[list[float]]:
    """[[fpr, tpr], ...]; empty when only one class is present."""
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return []
    fpr, tpr, _ = roc_curve(y_true, score)
    return _thin(fpr, tpr)


def pr_points(y_true: np.ndarray, score: np.ndarray) -> list[list[float]]:
    """[[recall, precision], ...] in increasing recall; empty without positives."""
    y_true = np.asarray(y_true).astype(int)
    if y_true.sum() == 0:
        return []
    precision, recall, _ = precision_recall_curve(y_true, score)
    return _thin(recall[::-1], precision[::-1])


def reliability_bins(y_true: np.ndarray, score: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin of predicted probability: count, mean prediction, observed positive rate."""
    y_true, score = np.asarray(y_true).astype(float), np.asarray(score, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({
                "low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                "mean_predicted": float(score[mask].mean()), "observed": float(y_true[mask].mean()),
            })
    return out
