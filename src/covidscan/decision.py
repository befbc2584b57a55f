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
from dataclasses import dataclass, field

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


NOT_EVALUABLE = "not evaluable"  # a study whose accepted slices are too few, or mostly outside the lungs, for the rule
DEFAULT_MAX_REFUSED_SHARE = 0.5  # of a study's lung-containing slices
MIN_ACCEPTED_CAP = 3  # the most accepted slices the rule asks for (fewer where validated studies had fewer)
DEFAULT_MIN_LUNG_SHARE = 0.5  # of a study's accepted slices, at least this share must show lung
WITHHELD_QUANTILE = 0.95  # the rule is relaxed until at most 5 % of validation patients would be withheld
LUNG_MASK_RELIABLE = 0.9  # the lung check is on only when the mask finds lungs in >= 90 % of studies (95 % Wilson lower bound)


@dataclass(frozen=True)
class EvidenceRule:
    """When the study rule may answer at all: enough accepted slices, not most of the lung refused, lungs in view.

    A study the gate mostly refuses (another hospital's scanner) or whose accepted slices show no lung (the upper
    abdomen, the neck) gives a study probability from a sliver of the wrong anatomy; such a study is answered
    "not evaluable with this model", with its counts. The limits are fitted on validation patients so that the
    studies the model was validated on are (almost) never withheld; the card records them and that check.
    """

    max_refused_share: float = DEFAULT_MAX_REFUSED_SHARE
    min_accepted: int = 1
    min_lung_share: float = DEFAULT_MIN_LUNG_SHARE  # 0: the lung check is off (lungs not found on validation images)
    chosen_on: str = "default (not fitted on validation patients)"
    validation: dict[str, object] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, object]:
        return {"max_refused_share": self.max_refused_share, "min_accepted": self.min_accepted, "min_lung_share": self.min_lung_share,
                "chosen_on": self.chosen_on, "validation": self.validation}

    @classmethod
    def from_json(cls, raw: object) -> EvidenceRule:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("evidence_rule must be an object")
        rule = cls(float(raw.get("max_refused_share", DEFAULT_MAX_REFUSED_SHARE)), int(raw.get("min_accepted", 1)),
                   float(raw.get("min_lung_share", DEFAULT_MIN_LUNG_SHARE)), str(raw.get("chosen_on", "")), dict(raw.get("validation") or {}))
        if not (0.0 <= rule.max_refused_share <= 1.0 and rule.min_accepted >= 1 and 0.0 <= rule.min_lung_share <= 1.0):
            raise ValueError(f"evidence_rule out of range: {rule.to_json()}")
        return rule

    def describe(self) -> str:
        if self.min_lung_share > 0:
            refused, lung = "of the slices that show lung", f"; at least {self.min_lung_share:.0%} of the accepted slices show lung"
        else:
            refused, lung = "of its slices", ("; no lung check (the validation studies did not show that the lung mask finds "
                                              "lungs in at least 90 % of studies)")
        return (f"answered only when at least {self.min_accepted} slice(s) are accepted and the input gate refuses at most "
                f"{self.max_refused_share:.0%} {refused}{lung}")

    def withheld_reason(self, accepted: np.ndarray, lung: np.ndarray) -> str:
        """Why a study with these per-slice gate verdicts and lung flags gets no answer ('' when it may be answered)."""
        accepted, lung = np.asarray(accepted, bool), np.asarray(lung, bool)
        used, total = int(accepted.sum()), len(accepted)
        if used < self.min_accepted:
            return f"only {used} of {total} slices accepted by the input gate (at least {self.min_accepted} needed)"
        lung_known = self.min_lung_share > 0 and bool(lung.any())
        base = lung if lung_known else np.ones(total, bool)
        refused = int((base & ~accepted).sum())
        if refused / int(base.sum()) > self.max_refused_share:
            where = "slices that show lung" if lung_known else "slices"
            return (f"the input gate refused {refused} of {int(base.sum())} {where} ({refused / int(base.sum()):.0%}; "
                    f"at most {self.max_refused_share:.0%} allowed): the study is unlike the images the model was validated on")
        in_lung = int((accepted & lung).sum())
        if self.min_lung_share > 0 and in_lung / used < self.min_lung_share:
            return (f"only {in_lung} of the {used} accepted slices show lung ({in_lung / used:.0%}; at least "
                    f"{self.min_lung_share:.0%} needed): the answer would come from outside the lungs")
        return ""

    def verdict(self, accepted: np.ndarray, lung: np.ndarray) -> tuple[str, str]:
        """('', '') when the study may be answered; else (REFUSED or NOT_EVALUABLE, why): the one place both the
        service's study answer and the report's count of withheld studies decide it."""
        if not np.asarray(accepted, bool).any():
            return REFUSED, "no slice is like the images the model was trained on"
        reason = self.withheld_reason(accepted, lung)
        return (NOT_EVALUABLE, reason) if reason else ("", "")


@dataclass(frozen=True)
class StudyAnswer:
    """One study's answer by the model card: a class, REFUSED (no slice accepted) or NOT_EVALUABLE (too little evidence)."""

    label: str
    probability: float  # NaN unless the study was answered
    used: int  # accepted slices
    total: int
    lung_slices: int  # slices that show lung (all slices, accepted or not)
    reason: str = ""  # why refused or not evaluable

    @property
    def answered(self) -> bool:
        return self.label not in (REFUSED, NOT_EVALUABLE)

    @property
    def refused(self) -> int:
        return self.total - self.used


def study_answer(
    scores: Sequence[float] | np.ndarray, accepted: Sequence[bool] | np.ndarray, lung: Sequence[bool] | np.ndarray,
    classes: list[str], rule: dict[str, object], evidence: EvidenceRule,
) -> StudyAnswer:
    """A study's answer from every slice's P(positive), gate verdict and lung flag: the evidence rule, then the study rule."""
    scores, accepted, lung = np.asarray(scores, float), np.asarray(accepted, bool), np.asarray(lung, bool)
    used, total, lungs = int(accepted.sum()), len(accepted), int(lung.sum())
    withheld, reason = evidence.verdict(accepted, lung)
    if withheld:
        return StudyAnswer(withheld, math.nan, used, total, lungs, reason)
    probability = aggregate_scores(scores[accepted], rule)
    label = classes[-1] if probability >= float(rule.get("threshold", 0.5)) else classes[0]  # type: ignore[arg-type]
    return StudyAnswer(label, probability, used, total, lungs)


def fit_evidence_rule(patients: np.ndarray, accepted: np.ndarray, lung: np.ndarray) -> EvidenceRule:
    """The evidence rule from validation patients: limits that withhold at most 5 % of the studies the model was
    validated on (never stricter than the defaults), and the lung check only where the lung mask is shown to find lungs
    in at least 90 % of them (the lower end of the 95 % Wilson interval)."""
    patients, accepted, lung = np.asarray(patients).astype(str), np.asarray(accepted, bool), np.asarray(lung, bool)
    names = np.unique(patients)
    if len(names) < 2 or (patients == "").any():
        return EvidenceRule(chosen_on="default: the validation images lack patient IDs and split groups", min_accepted=1)
    accepted_per_study = np.array([int(accepted[patients == n].sum()) for n in names])
    lung_found = float(lung.mean())
    # The lung check can be trusted only where the lung mask finds lungs in (almost) every validated study: on
    # sarscov2-ct's chest-cropped slices, or phantoms whose lungs it misses, it would withhold the model's own studies.
    from covidscan.evaluate.intervals import wilson

    with_lung = sum(bool((accepted & lung)[patients == n].any()) for n in names)
    studies_with_lung = with_lung / len(names)
    lung_check = wilson(with_lung, len(names))[0] >= LUNG_MASK_RELIABLE  # shown, not assumed: 10 of 10 studies is not enough
    refused_share, lung_share = [], []
    for n in names:
        rows = patients == n
        base = lung[rows] if lung_check and lung[rows].any() else np.ones(int(rows.sum()), bool)
        refused_share.append(float((base & ~accepted[rows]).sum() / base.sum()))
        used = int(accepted[rows].sum())
        lung_share.append(float((accepted[rows] & lung[rows]).sum() / used) if used else 1.0)
    max_refused = max(DEFAULT_MAX_REFUSED_SHARE, float(np.quantile(refused_share, WITHHELD_QUANTILE)))
    min_lung = min(DEFAULT_MIN_LUNG_SHARE, float(np.quantile(lung_share, 1 - WITHHELD_QUANTILE))) if lung_check else 0.0
    answered = accepted_per_study[accepted_per_study > 0]
    fewest = int(answered.min()) if len(answered) else 1  # the fewest accepted slices a validated study was answered from
    rule = EvidenceRule(round(max_refused, 4), max(1, min(MIN_ACCEPTED_CAP, fewest)), round(min_lung, 3),
                        chosen_on=f"validation part, {len(names)} patients or similarity groups")
    withheld = sum(bool(rule.withheld_reason(accepted[patients == n], lung[patients == n])) for n in names)
    return EvidenceRule(rule.max_refused_share, rule.min_accepted, rule.min_lung_share, rule.chosen_on, {
        "patients": len(names), "withheld": int(withheld), "fewest_accepted_slices": fewest,
        "refused_share_p95": round(float(np.quantile(refused_share, WITHHELD_QUANTILE)), 4),
        "lung_found_share": round(lung_found, 4), "studies_with_lung_share": round(studies_with_lung, 4),
        "accepted_lung_share_p05": round(float(np.quantile(lung_share, 1 - WITHHELD_QUANTILE)), 4),
    })


def rule_name(rule: dict[str, object]) -> str:
    return f"mean of the top {rule['k']} slices" if rule.get("aggregation") == "topk" else f"{rule.get('aggregation')} of the slices"


def rule_text(rule: dict[str, object]) -> str:
    """The study rule with its validated threshold, as the SR, the audit lines and the service state it."""
    return f"{rule_name(rule)}, threshold {float(rule.get('threshold', 0.5)):.3f}"  # type: ignore[arg-type]


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
