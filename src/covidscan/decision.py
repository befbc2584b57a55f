"""The deployed decision, fitted once on validation data and recorded in the model card.

One place decides how a slice probability is calibrated, which operating
points are offered, and how the slices of a study become one answer. The
report, `covidscan predict` and the service all read these fields from
model.json, so what is evaluated is what is served. Torch-free (the service
imports it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

AGGREGATIONS = ("mean", "max", "topk")
DEFAULT_STUDY_RULE: dict[str, object] = {"aggregation": "mean", "threshold": 0.5}  # runs without a chosen rule
REFUSED = "refused"  # the label of an image (or a study) the input gate refuses
DECISION_SETTINGS = ("calibrate", "target_sensitivity", "target_specificity", "aggregate", "top_k", "tta")


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log p / T): temperature scaling of probabilities (N, C); T = 1 leaves them as they are."""
    if temperature == 1.0:
        return np.asarray(probs, np.float32)
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def slice_label(probabilities: np.ndarray, classes: list[str], threshold: float) -> str:
    """One image's label: two classes at the card's threshold on P(positive), else the most probable class."""
    if len(classes) == 2:
        return classes[1] if probabilities[1] >= threshold else classes[0]
    return classes[int(np.argmax(probabilities))]


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of integer labels under probabilities (N, C)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def cross_fitted_temperature(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = 5) -> dict[str, object]:
    """Temperature scaling, kept only if it lowers the log loss of validation patients it was not fitted on.

    The validation part already chose the epoch and will choose the thresholds;
    a temperature fitted and judged on the same images could only look good.
    Here it is fitted on k-1 folds of validation patients and scored on the
    held-out fold, k times.
    """
    from sklearn.model_selection import GroupKFold

    from covidscan.evaluate.stats import fit_temperature

    labels, groups = np.asarray(labels).astype(int), np.asarray(groups).astype(str)
    k = min(folds, len(np.unique(groups)))
    if k < 2:
        return {"temperature": 1.0, "kept": False, "method": "none", "reason": "fewer than 2 validation patients: calibration cannot be checked"}
    held_out_nll = {"uncalibrated": 0.0, "temperature": 0.0}
    for fit_rows, check_rows in GroupKFold(k).split(probs, labels, groups):
        t = fit_temperature(np.log(np.clip(probs[fit_rows], 1e-12, 1.0)), labels[fit_rows])
        share = len(check_rows) / len(labels)
        held_out_nll["uncalibrated"] += share * log_loss(probs[check_rows], labels[check_rows])
        held_out_nll["temperature"] += share * log_loss(apply_temperature(probs[check_rows], t), labels[check_rows])
    kept = held_out_nll["temperature"] < held_out_nll["uncalibrated"]
    temperature = fit_temperature(np.log(np.clip(probs, 1e-12, 1.0)), labels) if kept else 1.0
    verdict = "kept" if kept else "not kept (it did not help on held-out validation patients)"
    return {
        "temperature": temperature, "kept": bool(kept), "method": "temperature scaling" if kept else "none",
        "held_out_log_loss": {name: round(value, 4) for name, value in held_out_nll.items()},
        "reason": (f"temperature scaling {verdict}: log loss on held-out validation patients {held_out_nll['uncalibrated']:.3f} "
                   f"uncalibrated vs {held_out_nll['temperature']:.3f} ({k}-fold cross-fitting over validation patients)"),
    }


def aggregate_scores(scores: Sequence[float] | np.ndarray, rule: dict[str, object]) -> float:
    """One study probability from its (accepted) slice probabilities, by the model card's rule."""
    values = np.sort(np.asarray(scores, float))[::-1]
    if len(values) == 0:
        return math.nan
    method = str(rule.get("aggregation", "mean"))
    if method == "max":
        return float(values[0])
    if method == "topk":
        return float(values[: max(1, int(rule.get("k", 3)))].mean())  # type: ignore[call-overload]
    return float(values.mean())


def study_answer(accepted: Sequence[float], classes: list[str], rule: dict[str, object]) -> tuple[str, float, int]:
    """(label, probability, slices used) of a study from its accepted slices' P(positive); REFUSED when none was accepted."""
    if not len(accepted):
        return REFUSED, math.nan, 0
    probability = aggregate_scores(accepted, rule)
    label = classes[-1] if probability >= float(rule.get("threshold", 0.5)) else classes[0]  # type: ignore[arg-type]
    return label, probability, len(accepted)


def rule_name(rule: dict[str, object]) -> str:
    return f"mean of the top {rule['k']} slices" if rule.get("aggregation") == "topk" else f"{rule.get('aggregation')} of the slices"


def study_scores(patient_ids: np.ndarray, y: np.ndarray, score: np.ndarray, rule: dict[str, object]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient IDs, patient labels (any positive slice), study probabilities) by the rule."""
    patient_ids = np.asarray(patient_ids).astype(str)
    names, index = np.unique(patient_ids, return_inverse=True)
    labels = np.zeros(len(names), int)
    np.maximum.at(labels, index, np.asarray(y).astype(int))
    scores = np.array([aggregate_scores(np.asarray(score)[index == i], rule) for i in range(len(names))])
    return names, labels, scores


def _balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Study threshold maximising sensitivity + specificity; 0.5 when it is among the best cuts, else the middle of the best gap."""
    from covidscan.evaluate.metrics import binary_metrics

    def youden(t: float) -> float:
        m = binary_metrics(labels, scores, t)
        return float(m["sensitivity"] + m["specificity"])

    cuts = np.unique(scores)
    candidates = [0.5] + [float((a + b) / 2) for a, b in zip(cuts[:-1], cuts[1:])]
    best = max(youden(t) for t in candidates)
    return 0.5 if youden(0.5) >= best - 1e-12 else next(t for t in candidates if youden(t) >= best - 1e-12)


def choose_study_rule(
    patient_ids: np.ndarray, y: np.ndarray, score: np.ndarray, aggregate: str, top_k: int
) -> dict[str, object]:
    """The slice-to-study rule and the study threshold, chosen on validation patients.

    `aggregate='auto'` compares mean, max and top-k by patient-level AUC (ties:
    log loss, then the simpler rule); otherwise the named rule is kept.
    """
    from covidscan.evaluate.metrics import auc_roc

    options = [{"aggregation": a, "k": top_k} if a == "topk" else {"aggregation": a} for a in (AGGREGATIONS if aggregate == "auto" else (aggregate,))]
    scored = []
    for order, rule in enumerate(options):
        _, labels, scores = study_scores(patient_ids, y, score, rule)
        if len(np.unique(labels)) < 2:
            return {**options[0], "threshold": 0.5, "chosen_on": "default: the validation part has patients of one class only"}
        with np.errstate(divide="ignore"):
            loss = float(-np.mean(labels * np.log(np.clip(scores, 1e-12, 1)) + (1 - labels) * np.log(np.clip(1 - scores, 1e-12, 1))))
        scored.append((-auc_roc(labels, scores), loss, order, rule, labels, scores))
    scored.sort(key=lambda item: item[:3])
    _, _, _, rule, labels, scores = scored[0]
    return {
        **rule,
        "threshold": _balanced_threshold(labels, scores),
        "chosen_on": f"validation part, {len(labels)} patients ({int(labels.sum())} positive)",
        "candidates": {rule_name(r): {"auc": round(-a, 4), "log_loss": round(ll, 4)} for a, ll, _, r, _, _ in scored},
    }
