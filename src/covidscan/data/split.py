"""Leakage-free splits: every patient's images fall on one side only.

Stratified by label, grouped by patient, seeded. Slices of one patient are
near-identical, so a slice-level split would measure memory, not diagnosis.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from covidscan.errors import DataError


def check_patient_groups(frame: pd.DataFrame, where: str = "manifest") -> pd.Series:
    """Return the patient ID per row; refuse missing IDs and patients with mixed labels."""
    patients = frame["patient_id"].astype(str).str.strip()
    missing = int((patients == "").sum())
    if missing:
        examples = frame.loc[patients == "", "path"].head(3).tolist()
        raise DataError(where, f"{missing} image(s) have no patient ID (e.g. {examples}); split by cluster instead")
    labels_per_patient = frame.groupby(patients)["label"].nunique()
    mixed = labels_per_patient[labels_per_patient > 1].index.tolist()
    if mixed:
        raise DataError(where, f"patient(s) with more than one label: {mixed[:10]}{' ...' if len(mixed) > 10 else ''}")
    return patients


def _one_fold_out(labels: np.ndarray, groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Boolean mask of a stratified, grouped hold-out of about `share` of the rows."""
    n_groups = len(np.unique(groups))
    n_splits = int(round(1.0 / share))
    n_splits = max(2, min(n_splits, n_groups))
    counts = pd.Series(labels).groupby(groups).first().value_counts()
    if counts.min() < 2:
        raise DataError("split", f"each class needs at least 2 patients/groups to split; have {counts.to_dict()}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held_out = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), bool)
    mask[held_out] = True
    return mask


def grouped_train_val_test(
    labels: np.ndarray, groups: np.ndarray, test_size: float, val_size: float, seed: int
) -> np.ndarray:
    """Assign 'train'/'val'/'test' to every row, keeping each group on one side."""
    split = np.full(len(labels), "train", dtype=object)
    test = _one_fold_out(labels, groups, test_size, seed)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    val_share = val_size / (1.0 - test_size)
    val = _one_fold_out(labels[rest], groups[rest], val_share, seed + 1)
    split[rest[val]] = "val"
    return split


def split_by_patient(
    frame: pd.DataFrame, test_size: float = 0.2, val_size: float = 0.2, seed: int = 0, where: str = "manifest"
) -> pd.DataFrame:
    """A copy of `frame` with `group` (= patient) and `split` columns filled."""
    patients = check_patient_groups(frame, where)
    out = frame.copy()
    out["group"] = patients.values
    out["split"] = grouped_train_val_test(
        out["label"].astype(str).to_numpy(), patients.to_numpy(), test_size, val_size, seed
    )
    return out
