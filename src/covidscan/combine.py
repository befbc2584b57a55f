"""How an ensemble turns its members' probabilities into one (torch-free; the service imports it).

The members' inputs are their deployed probabilities (each calibrated as its
own card says). soft: the mean; weighted: a weighted mean; stacking: a
logistic regression on the members' log-odds. Weights and the regression are
fitted on validation predictions only (covidscan.ensemble.fit_combiner).
"""
from __future__ import annotations

import numpy as np

METHODS = ("soft", "weighted", "stacking")


def stacking_features(member_probs: list[np.ndarray]) -> np.ndarray:
    """Meta-learner inputs: each member's log-odds of the positive class (two classes) or log-probabilities."""
    clipped = [np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6) for p in member_probs]
    if clipped[0].shape[1] == 2:
        return np.stack([np.log(p[:, 1] / p[:, 0]) for p in clipped], axis=1)
    return np.concatenate([np.log(p) for p in clipped], axis=1)


def combine(member_probs: list[np.ndarray], combiner: dict[str, object]) -> np.ndarray:
    """Member probabilities [(N, C)] -> ensemble probabilities (N, C), by the card's combiner."""
    method = str(combiner.get("method", "soft"))
    if method == "stacking":
        features = stacking_features(member_probs)
        coef = np.asarray(combiner["coef"], np.float64)  # (1, M) for two classes, else (C, M*C)
        intercept = np.asarray(combiner["intercept"], np.float64)
        z = features @ coef.T + intercept
        if coef.shape[0] == 1:
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1 - p1, p1], axis=1).astype(np.float32)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    weights = np.asarray(combiner.get("weights") or [1.0] * len(member_probs), np.float64)
    weights = weights / weights.sum()
    return np.einsum("m,mnc->nc", weights, np.stack(member_probs).astype(np.float64)).astype(np.float32)


def heatmap_weights(combiner: dict[str, object], members: int) -> np.ndarray:
    """How much each member's heat map counts: its vote weight, or for stacking its |coefficient| share."""
    if combiner.get("method") == "stacking":
        coef = np.abs(np.asarray(combiner["coef"], np.float64))
        share = coef[0] if coef.shape[0] == 1 else coef.reshape(coef.shape[0], members, -1).sum(axis=(0, 2))
    else:
        share = np.asarray(combiner.get("weights") or [1.0] * members, np.float64)
    total = share.sum()
    return share / total if total > 0 else np.full(members, 1.0 / members)
