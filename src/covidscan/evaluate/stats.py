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


def mcnemar_test(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, float | int]:
    """McNemar's test of two classifiers on the same images: exact binomial when discordant pairs < 25."""
    from scipy.stats import binomtest, chi2

    correct_a = np.asarray(pred_a) == np.asarray(y_true)
    correct_b = np.asarray(pred_b) == np.asarray(y_true)
    b = int((correct_a & ~correct_b).sum())  # only A right
    c = int((~correct_a & correct_b).sum())  # only B right
    if b + c == 0:
        return {"only_a_correct": b, "only_b_correct": c, "p_value": 1.0, "method": "no discordant pairs"}  # type: ignore[dict-item]
    if b + c < 25:
        p = float(binomtest(b, b + c, 0.5).pvalue)
        method = "exact binomial"
    else:
        statistic = (abs(b - c) - 1) ** 2 / (b + c)  # with continuity correction
        p = float(chi2.sf(statistic, 1))
        method = "chi-squared with continuity correction"
    return {"only_a_correct": b, "only_b_correct": c, "p_value": p, "method": method}  # type: ignore[dict-item]


def _midrank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, float]:
    """DeLong's test for the difference of two correlated AUCs (same images)."""
    from scipy.stats import norm

    y_true = np.asarray(y_true).astype(int)
    pos, neg = y_true == 1, y_true == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        return {"auc_a": math.nan, "auc_b": math.nan, "difference": math.nan, "p_value": math.nan}
    v10, v01, aucs = [], [], []
    for score in (np.asarray(score_a, float), np.asarray(score_b, float)):
        tx, ty = _midrank(score[pos]), _midrank(score[neg])
        tz = _midrank(np.concatenate([score[pos], score[neg]]))
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
        aucs.append(auc)
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    difference = float(aucs[0] - aucs[1])
    if variance <= 0:
        return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": difference, "p_value": 1.0 if difference == 0 else 0.0}
    z = difference / math.sqrt(variance)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": difference, "p_value": float(2 * norm.sf(abs(z)))}


def threshold_for(y_true: np.ndarray, score: np.ndarray, sensitivity: float | None = None, specificity: float | None = None) -> float:
    """The operating point chosen on *validation* data: the highest threshold reaching the target
    sensitivity (screening), or the lowest reaching the target specificity."""
    y_true, score = np.asarray(y_true).astype(int), np.asarray(score, float)
    if (sensitivity is None) == (specificity is None):
        raise ValueError("give exactly one of sensitivity or specificity")
    candidates = np.unique(np.concatenate([score, [0.0, 1.0 + 1e-9]]))
    if sensitivity is not None:
        positives = score[y_true == 1]
        ok = [t for t in candidates if positives.size and np.mean(positives >= t) >= sensitivity]
        return float(max(ok)) if ok else 0.0
    negatives = score[y_true == 0]
    ok = [t for t in candidates if negatives.size and np.mean(negatives < t) >= specificity]  # type: ignore[operator]
    return float(min(ok)) if ok else 1.0 + 1e-9


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling fitted on validation logits (N, C): one scalar T > 0 minimising NLL."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits, labels = np.asarray(logits, float), np.asarray(labels).astype(int)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(result.x))


def clustered_mcnemar_test(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: np.ndarray) -> dict[str, float | int | str]:
    """McNemar's test for clustered pairs (Durkalski et al. 2003): a patient's slices count as one unit.

    chi2 = (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2, 1 degree of freedom, where b_k and
    c_k count the slices of patient k that only A, or only B, classifies correctly.
    With one slice per patient it is McNemar's test without continuity correction.
    """
    from scipy.stats import chi2

    from covidscan.evaluate.intervals import cluster_index

    correct_a = np.asarray(pred_a) == np.asarray(y_true)
    correct_b = np.asarray(pred_b) == np.asarray(y_true)
    index, clusters = cluster_index(groups, len(correct_a))
    difference = np.bincount(index, weights=(correct_a & ~correct_b).astype(float)) - np.bincount(index, weights=(~correct_a & correct_b).astype(float))
    b, c = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    denominator = float((difference**2).sum())
    if denominator == 0:
        return {"only_a_correct": b, "only_b_correct": c, "clusters": clusters, "p_value": 1.0,
                "method": "clustered McNemar (Durkalski): no discordant patients"}
    statistic = float(difference.sum()) ** 2 / denominator
    return {"only_a_correct": b, "only_b_correct": c, "clusters": clusters, "p_value": float(chi2.sf(statistic, 1)),
            "method": "clustered McNemar (Durkalski), the slices of one patient (or group) as one unit"}


def clustered_delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, groups: np.ndarray) -> dict[str, float | str]:
    """Difference of two correlated AUCs with the variance summed per patient (Obuchowski 1997).

    With one image per patient it equals DeLong's test up to the (K-1)/K factor.
    """
    from scipy.stats import norm

    from covidscan.evaluate.intervals import auc_influence, cluster_index, clustered_variance

    y_true = np.asarray(y_true).astype(int)
    if int(y_true.sum()) < 2 or int((y_true == 0).sum()) < 2:
        return {"auc_a": math.nan, "auc_b": math.nan, "difference": math.nan, "p_value": math.nan, "method": "too few images of a class"}
    auc_a, influence_a = auc_influence(y_true, score_a)
    auc_b, influence_b = auc_influence(y_true, score_b)
    clusters = cluster_index(groups, len(y_true))[1]
    variance = clustered_variance(influence_a - influence_b, groups)
    difference = auc_a - auc_b
    method = f"clustered DeLong (Obuchowski), {clusters} patients or groups"
    if variance <= 0:
        return {"auc_a": auc_a, "auc_b": auc_b, "difference": difference, "p_value": 1.0 if difference == 0 else 0.0, "method": method}
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": difference, "p_value": float(2 * norm.sf(abs(difference) / math.sqrt(variance))), "method": method}
