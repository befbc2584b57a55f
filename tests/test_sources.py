from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.data.sources import LabelSet, index_folder
from covidscan.errors import DataError


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


def test_patient_folder_layout(tiny_phantom: Path) -> None:
    frame = index_folder(tiny_phantom)
    assert len(frame) == 48
    assert set(frame["label"]) == {"COVID", "non-COVID"}
    assert frame["patient_id"].str.len().min() > 0
    assert frame.groupby("patient_id")["label"].nunique().max() == 1


def test_flat_layout_and_case_insensitive_aliases(tmp_path: Path) -> None:
    _img(tmp_path / "CT_COVID" / "a.png")
    _img(tmp_path / "CT_NonCOVID" / "b.jpg")
    _img(tmp_path / "CT_NonCOVID" / ".hidden.png")
    frame = index_folder(tmp_path)
    assert sorted(frame["label"]) == ["COVID", "non-COVID"]
    assert (frame["patient_id"] == "").all()


def test_multiclass_label_set(tmp_path: Path) -> None:
    for name in ("covid", "PNEUMONIA", "Normal"):
        _img(tmp_path / name / "x.png")
    frame = index_folder(tmp_path, LabelSet.parse("COVID,pneumonia,normal"))
    assert sorted(frame["label"]) == ["COVID", "normal", "pneumonia"]


def test_auto_labels_use_folder_names(tmp_path: Path) -> None:
    _img(tmp_path / "cats" / "x.png")
    _img(tmp_path / "dogs" / "y.png")
    assert sorted(index_folder(tmp_path, LabelSet.parse("auto"))["label"]) == ["cats", "dogs"]


@pytest.mark.parametrize(
    "setup,problem",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no images found"),
        (lambda root: _img(root / "COVID" / "a.png"), "only one class"),
        (lambda root: (_img(root / "COVID" / "a.png"), _img(root / "kittens" / "b.png")), "match no class"),
    ],
)
def test_bad_folders_name_path_and_problem(tmp_path: Path, setup, problem: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError) as info:
        index_folder(root)
    assert problem in str(info.value) and "data" in str(info.value)
