"""Chest X-ray specifics: view position kept in the manifest, laterals left out, the X-ray seeds' backbones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom import dcmread

from dicom_helpers import write_dicom


def _xray(path: Path, view: str, photometric: str = "MONOCHROME1") -> Path:
    write_dicom(path, (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.int16), modality="DX", intercept=0.0, photometric=photometric)
    ds = dcmread(path)
    ds.ViewPosition = view
    ds.save_as(path)
    return path


def test_dicom_xray_view_position_becomes_a_column_and_laterals_are_left_out(tmp_path: Path) -> None:
    from covidscan.data.sources import index_folder

    _xray(tmp_path / "COVID" / "p1" / "IM1", "PA")
    _xray(tmp_path / "COVID" / "p1" / "IM2", "LL")  # the lateral of the same study
    _xray(tmp_path / "non-COVID" / "p2" / "IM1", "AP", "MONOCHROME2")
    frame = index_folder(tmp_path)
    assert sorted(frame["view"]) == ["AP", "PA"] and not frame["path"].str.endswith("IM2").any()


def test_ieee8023_laterals_are_left_out(tmp_path: Path) -> None:
    from covidscan.data.public_sets import load_ieee8023

    (tmp_path / "images").mkdir()
    rows = []
    for i, (finding, view) in enumerate([("COVID-19", "PA"), ("COVID-19", "L"), ("Pneumonia", "AP Supine"), ("No Finding", "AP")]):
        Image.fromarray(np.full((32, 32), 60 * i, np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        rows.append({"file": f"images/{i}.jpg", "finding": finding, "patientid": str(i), "view": view})
    pd.DataFrame(rows).to_csv(tmp_path / "index.csv", index=False)
    frame = load_ieee8023(tmp_path, None)
    assert sorted(frame["view"]) == ["AP", "AP Supine", "PA"] and "L" not in set(frame["view"])
