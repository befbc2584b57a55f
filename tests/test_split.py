from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidscan.data.manifest import new_manifest
from covidscan.data.split import split_by_patient
from covidscan.errors import DataError


def _manifest(n_patients: int = 40, slices: int = 5, covid_share: float = 0.4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "COVID" if p < n_patients * covid_share else "non-COVID"
        for s in range(int(rng.integers(1, slices + 1))):
            rows.append({"path": f"/x/{p}/{s}.png", "label": label, "patient_id": f"p{p}"})
    return new_manifest(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_patient_on_two_sides_and_ratios_kept(seed: int) -> None:
    frame = split_by_patient(_manifest(seed=seed), test_size=0.2, val_size=0.2, seed=seed)
    assert set(frame["split"]) == {"train", "val", "test"}
    assert frame.groupby("group")["split"].nunique().max() == 1
    overall = (frame["label"] == "COVID").mean()
    for part in ("train", "val", "test"):
        share = (frame.loc[frame["split"] == part, "label"] == "COVID").mean()
        assert abs(share - overall) < 0.2, (part, share, overall)
    test_share = (frame["split"] == "test").mean()
    assert 0.1 < test_share < 0.3


def test_deterministic_for_a_seed() -> None:
    a = split_by_patient(_manifest(), seed=5)["split"].tolist()
    b = split_by_patient(_manifest(), seed=5)["split"].tolist()
    c = split_by_patient(_manifest(), seed=6)["split"].tolist()
    assert a == b and a != c


def test_refuses_missing_patient_ids() -> None:
    frame = _manifest()
    frame.loc[3, "patient_id"] = ""
    with pytest.raises(DataError, match="no patient ID"):
        split_by_patient(frame)


def test_refuses_patients_with_mixed_labels_and_names_them() -> None:
    frame = _manifest()
    frame.loc[frame["patient_id"] == "p0", "label"] = ["non-COVID"] + ["COVID"] * (int((frame["patient_id"] == "p0").sum()) - 1)
    if frame.loc[frame["patient_id"] == "p0", "label"].nunique() < 2:
        frame = pd.concat([frame, new_manifest([{"path": "/x/p0/extra.png", "label": "non-COVID", "patient_id": "p0"}])])
    with pytest.raises(DataError, match="p0"):
        split_by_patient(frame)


# --- similarity clusters and the leakage figure -------------------------------------------
from covidscan.data.split import cluster_groups, leakage_report, near_duplicate_components, split_manifest  # noqa: E402


def _patients_as_vectors(n_patients: int = 60, slices: int = 8, dim: int = 64, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Each synthetic 'patient' is a random direction; its slices are small perturbations of it."""
    rng = np.random.default_rng(seed)
    rows, vectors = [], []
    for p in range(n_patients):
        centre = rng.normal(size=dim)
        for s in range(slices):
            v = centre + rng.normal(scale=0.12, size=dim)
            vectors.append(v / np.linalg.norm(v))
            rows.append({"path": f"/x/{p}/{s}.png", "label": "COVID" if p % 2 else "non-COVID", "patient_id": ""})
    return new_manifest(rows), np.array(vectors, np.float32)


def test_cluster_split_keeps_every_patient_on_one_side_without_knowing_patients() -> None:
    frame, vectors = _patients_as_vectors()
    truth = frame["path"].str.split("/").str[2]
    out, report = split_manifest(frame, "cluster", vectors, 0.2, 0.2, seed=0)
    assert out.groupby(truth)["split"].nunique().max() == 1  # no hidden patient straddles the split
    assert out.groupby("group")["split"].nunique().max() == 1
    assert report["leakage_test"]["near_duplicates"] == 0 and not report["flagged"]
    assert 0 < report["groups"] <= 60  # not finer than the patients


def test_random_split_leaks_and_is_flagged() -> None:
    frame, vectors = _patients_as_vectors()
    _, report = split_manifest(frame, "random", vectors, 0.2, 0.2, seed=0)
    assert report["leakage_test"]["share"] > 0.5 and report["flagged"] and "leakage" in report["warning"]


def test_near_duplicate_chains_end_in_one_group() -> None:
    angles = np.radians([0.0, 20.0, 40.0, 180.0])  # cos 20 deg = 0.94: a-b and b-c are near, a-c (0.77) is not
    vectors = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    components = near_duplicate_components(vectors, 0.92)
    assert components[0] == components[1] == components[2] != components[3]
    groups = cluster_groups(vectors, np.array(["a", "a", "b", "b"]), n_groups=4)
    assert groups[0] == groups[1] == groups[2]  # the chain crosses classes and still stays together


def test_cluster_split_is_deterministic_and_stratified() -> None:
    frame, vectors = _patients_as_vectors(seed=3)
    a, _ = split_manifest(frame, "cluster", vectors, seed=4)
    b, _ = split_manifest(frame, "cluster", vectors, seed=4)
    c, _ = split_manifest(frame, "cluster", vectors, seed=5)
    assert a["split"].tolist() == b["split"].tolist() and a["split"].tolist() != c["split"].tolist()
    for part in ("train", "val", "test"):
        share = (a.loc[a["split"] == part, "label"] == "COVID").mean()
        assert abs(share - 0.5) < 0.1


def test_folds_put_each_group_in_one_fold() -> None:
    frame, vectors = _patients_as_vectors()
    out, report = split_manifest(frame, "cluster", vectors, folds=5, seed=0)
    assert sorted(out["fold"].unique()) == [0, 1, 2, 3, 4]
    assert out.groupby("group")["fold"].nunique().max() == 1
    assert len(report["leakage_per_fold"]) == 5 and not report["flagged"]


def test_leakage_report_counts_near_duplicates() -> None:
    vectors = np.eye(4, dtype=np.float32)
    vectors = np.vstack([vectors, vectors[0]])  # image 4 duplicates image 0
    report = leakage_report(vectors, held_out=np.array([4, 1]), train=np.array([0, 2, 3]))
    assert report["near_duplicates"] == 1 and report["share"] == 0.5 and report["flagged"]


def test_threshold_calibrates_on_patients_when_they_all_look_alike() -> None:
    from covidscan.data.split import NEAR_DUPLICATE_SIMILARITY, calibrated_threshold

    frame, distinct = _patients_as_vectors(n_patients=20, slices=4)
    patients = frame["path"].str.split("/").str[2].to_numpy()
    assert calibrated_threshold(distinct, patients) == NEAR_DUPLICATE_SIMILARITY
    alike = distinct * 0.1 + np.ones(distinct.shape[1]) / np.sqrt(distinct.shape[1])  # every patient nearly the same
    alike /= np.linalg.norm(alike, axis=1, keepdims=True)
    assert calibrated_threshold(alike.astype(np.float32), patients) > 0.98


def test_auto_splits_by_patient_when_every_image_has_an_id_and_by_cluster_otherwise() -> None:
    frame, vectors = _patients_as_vectors(n_patients=30)
    out, report = split_manifest(frame, "auto", vectors, 0.2, 0.2, seed=0)
    assert report["by"] == "cluster" and out["group"].str.startswith("cluster-").all()
    frame["patient_id"] = frame["path"].str.split("/").str[2]
    out, report = split_manifest(frame, "auto", vectors, 0.2, 0.2, seed=0)
    assert report["by"] == "patient" and out.groupby("patient_id")["split"].nunique().max() == 1
    assert (out["group"] == out["patient_id"]).all()
