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
