"""Coverage check of the confidence intervals on clustered synthetic scores.

A 95 % interval must contain the true value in about 95 % of repeated
studies. Each simulated study has a few patients per class with several
slices each; a patient's slices share a random effect, as real CT slices
do. The true values come from one very large simulated population.
Used by `bench/ci_coverage.py` (many studies) and the tests (a few hundred).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from covidscan.evaluate.aggregate import aggregate_by_patient
from covidscan.evaluate.metrics import auc_roc

Interval = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, dict[str, float]]]


@dataclass(frozen=True)
class ClusteredScores:
    """Score model: logit = shift * label + patient effect + slice noise."""

    patients_per_class: int = 6
    slices: int = 6
    shift: float = 1.5
    patient_sd: float = 1.0
    slice_sd: float = 1.0

    def sample(self, rng: np.random.Generator, patients_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, scores in (0, 1), patient IDs) of one simulated study."""
        k = patients_per_class or self.patients_per_class
        patient_label = np.repeat([0, 1], k)
        effect = rng.normal(0.0, self.patient_sd, 2 * k)
        label = np.repeat(patient_label, self.slices)
        logit = self.shift * label + np.repeat(effect, self.slices) + rng.normal(0.0, self.slice_sd, len(label)) - self.shift / 2
        return label, 1.0 / (1.0 + np.exp(-logit)), np.repeat(np.arange(2 * k), self.slices).astype(str)

    def truth(self, threshold: float = 0.5, population: int = 20000, seed: int = 12345) -> dict[str, dict[str, float]]:
        """True slice-level and patient-level (mean of slices) sensitivity, specificity and AUC."""
        rng = np.random.default_rng(seed)
        y, score, patient = self.sample(rng, population)
        per_patient = aggregate_by_patient(patient, y, score, "mean")
        out = {}
        for level, (labels, scores) in {"slice": (y, score), "patient": (per_patient["label"].to_numpy(), per_patient["score"].to_numpy())}.items():
            positive = labels == 1
            out[level] = {
                "sensitivity": float((scores[positive] >= threshold).mean()),
                "specificity": float((scores[~positive] < threshold).mean()),
                "auc": auc_roc(labels, scores),
            }
        return out


def coverage(
    method: Interval, model: ClusteredScores, studies: int, level: str = "slice", threshold: float = 0.5, seed: int = 0,
    metrics: tuple[str, ...] = ("sensitivity", "specificity", "auc"),
) -> dict[str, dict[str, float]]:
    """Share of simulated studies whose interval contains the truth, and the mean interval width, per metric.

    `method(y, score, groups)` returns {metric: {"low", "high"}}; at patient
    level it gets one mean score per patient (and each patient as its own group).
    """
    truth = model.truth(threshold)[level]
    rng = np.random.default_rng(seed)
    hits = {m: 0 for m in metrics}
    widths: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(studies):
        y, score, patient = model.sample(rng)
        if level == "patient":
            table = aggregate_by_patient(patient, y, score, "mean")
            y, score, patient = table["label"].to_numpy(), table["score"].to_numpy(), table["patient_id"].to_numpy()
        result = method(y, score, patient)
        for m in metrics:
            low, high = result[m]["low"], result[m]["high"]
            hits[m] += int(low <= truth[m] <= high)
            widths[m].append(high - low)
    return {m: {"coverage": hits[m] / studies, "mean_width": float(np.mean(widths[m])), "truth": truth[m]} for m in metrics}
