"""From slice probabilities to one probability per patient (or study).

A clinician decides per patient, and slices of one patient are not
independent, so patient-level metrics are the ones to quote when IDs exist.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from covidscan.errors import ConfigError

AGGREGATIONS = ("mean", "max", "topk")


def aggregate_by_patient(
    patient_ids: np.ndarray, y_true: np.ndarray, score: np.ndarray, method: str = "mean", k: int = 3
) -> pd.DataFrame:
    """One row per patient: patient_id, label (1 if any slice is positive), score, slices.

    `topk`: mean of the k highest slice probabilities (robust to one noisy slice,
    sensitive to focal disease that `mean` dilutes).
    """
    if method not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {method!r}; choose one of {list(AGGREGATIONS)}")
    frame = pd.DataFrame({"patient_id": np.asarray(patient_ids).astype(str), "y": np.asarray(y_true).astype(int), "score": np.asarray(score, float)})

    def reduce(scores: pd.Series) -> float:
        values = np.sort(scores.to_numpy())[::-1]
        if method == "mean":
            return float(values.mean())
        if method == "max":
            return float(values[0])
        return float(values[: max(1, k)].mean())

    grouped = frame.groupby("patient_id", sort=True)
    return pd.DataFrame({
        "label": grouped["y"].max(),
        "score": grouped["score"].apply(reduce),
        "slices": grouped.size(),
    }).reset_index()
