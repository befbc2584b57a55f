"""Confidence intervals by bootstrap over groups (patients or similarity clusters), not slices.

Slices of one patient are not independent: resampling slices would give
intervals that are too narrow. Resampling whole groups, stratified by the
group's label, keeps the class balance and the within-patient correlation.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from covidscan.evaluate.metrics import binary_metrics

CI_METRICS = (
    "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "npv", "f1",
    "auc", "auc_pr", "mcc", "brier", "ece",
)


def bootstrap_ci(
    y_true: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CI per metric; groups resampled within their (majority) class."""
    y_true, score = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    group_label = np.array([np.bincount(y_true[m]).argmax() for m in members])
    strata = [np.flatnonzero(group_label == c) for c in np.unique(group_label)]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in CI_METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n_boot):
            chosen = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
            rows = np.concatenate([members[g] for g in chosen])
            values = binary_metrics(y_true[rows], score[rows], threshold)
            for name in CI_METRICS:
                samples[name].append(float(values[name]))
    alpha = (1.0 - level) / 2.0
    point = binary_metrics(y_true, score, threshold)
    out = {}
    for name, values in samples.items():
        finite = np.array([v for v in values if not math.isnan(v)])
        low, high = (np.quantile(finite, [alpha, 1 - alpha]) if len(finite) else (math.nan, math.nan))
        out[name] = {"value": float(point[name]), "low": float(low), "high": float(high)}
    return out
