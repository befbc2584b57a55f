"""From slice probabilities to one probability per patient (or study), as a table.

A clinician decides per patient, and slices of one patient are not
independent, so patient-level metrics are the ones to quote when IDs exist.
The rule itself lives in covidscan.decision (shared with the service).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from covidscan.decision import AGGREGATIONS, study_scores
from covidscan.errors import ConfigError


def aggregate_by_patient(
    patient_ids: np.ndarray, y_true: np.ndarray, score: np.ndarray, method: str = "mean", k: int = 3
) -> pd.DataFrame:
    """One row per patient: patient_id, label (1 if any slice is positive), score, slices.

    `topk`: mean of the k highest slice probabilities (robust to one noisy slice,
    sensitive to focal disease that `mean` dilutes).
    """
    if method not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {method!r}; choose one of {list(AGGREGATIONS)}")
    names, labels, scores = study_scores(patient_ids, y_true, score, {"aggregation": method, "k": k})
    slices = pd.Series(np.asarray(patient_ids).astype(str)).value_counts()
    return pd.DataFrame({"patient_id": names, "label": labels, "score": scores, "slices": slices.reindex(names).to_numpy()})
