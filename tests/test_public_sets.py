"""Each known public set's loader, on a small synthetic imitation of its layout and quirks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidscan.data.public_sets import detect_kind, index_source, index_sources
from covidscan.errors import DataError


def _img(path: Path, mode: str = "L", size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode).save(path)


@pytest.fixture()
def ucsd(tmp_path: Path) -> Path:
    root = tmp_path / "COVID-CT"
    covid = ["2020.01.24.919183-p27-132.png", "2020.01.24.919183-p27-133.png", "2020.03.01.111-p5-10%0.png", "2020.03.01.111-p5-10%1.png", "2020.04.01.222-p9-20.png"]
    noncovid = ["1.png", "2%0.jpg", "2%1.jpg", "3.png"]
    for name in covid:
        _img(root / "CT_COVID" / name, "RGBA")
    for name in noncovid:
        _img(root / "CT_NonCOVID" / name, "RGB")
    (root / "Data-split" / "TrainingTXT").mkdir(parents=True)
    (root / "Data-split" / "ValidationTXT").mkdir(parents=True)
    (root / "Data-split" / "TrainingTXT" / "trainCT_COVID.txt").write_bytes("\r\n".join(covid[:3]).encode() + b"\r\n")
    (root / "Data-split" / "ValidationTXT" / "valCT_COVID.txt").write_bytes(covid[3].encode() + b"\r\n")
    (root / "Data-split" / "TrainingTXT" / "trainCT_NonCOVID.txt").write_bytes(b"1.png\r\n2%0.jpg\r\n2%1.jpg\r\n")
    (root / "Meta").mkdir()
    # Two different papers both call their patient "Patient 1"; one file name lacks its extension;
    # the last COVID file has no metadata row at all.
    pd.DataFrame({
        "File name": ["2020.01.24.919183-p27-132.png", "2020.01.24.919183-p27-133", "2020.03.01.111-p5-10%0.png", "2020.03.01.111-p5-10%1.png"],
        "Patient ID": ["Patient 1", "Patient 1", "Patient 1", "Patient 1"],
    }).to_excel(root / "Meta" / "COVID-CT-MetaInfo.xlsx", index=False)
    pd.DataFrame({"image name": noncovid, "patient id": ["p_a", "p_b", "p_b", "p_c"]}).to_csv(root / "Meta" / "NonCOVID-CT-MetaInfo.csv")
    return root


def test_ucsd_loader_keys_patients_by_paper_and_keeps_official_split(ucsd: Path) -> None:
    assert detect_kind(ucsd) == "ucsd-covid-ct"
    frame = index_source(ucsd).set_index("path")
    names = {Path(p).name: row for p, row in frame.iterrows()}
    assert names["2020.01.24.919183-p27-133.png"]["patient_id"] == names["2020.01.24.919183-p27-132.png"]["patient_id"]
    assert names["2020.01.24.919183-p27-132.png"]["patient_id"] != names["2020.03.01.111-p5-10%0.png"]["patient_id"]
    assert names["2020.04.01.222-p9-20.png"]["patient_id"]  # fallback key for files missing from the metadata
    assert names["2%0.jpg"]["patient_id"] == names["2%1.jpg"]["patient_id"] != names["1.png"]["patient_id"]
    assert names["2020.03.01.111-p5-10%1.png"]["official_split"] == "val"
    assert names["3.png"]["official_split"] == ""
    assert set(frame["label"]) == {"COVID", "non-COVID"}


def test_ieee8023_drops_unlabelled_and_maps_findings(tmp_path: Path) -> None:
    root = tmp_path / "ieee8023"
    rows = [("a.jpg", "COVID-19", "1", "PA"), ("b.jpg", "COVID-19, ARDS", "1", "AP"), ("c.jpg", "Streptococcus", "2", "PA"),
            ("d.jpg", "No Finding", "3", "PA"), ("e.jpg", "todo", "4", "PA")]
    for name, *_ in rows:
        _img(root / "images" / name)
    pd.DataFrame(rows, columns=["original_file", "finding", "patientid", "view"]).assign(file=[f"images/{r[0]}" for r in rows]).to_csv(root / "index.csv", index=False)
    assert detect_kind(root) == "ieee8023"
    three = index_source(root, labels="COVID,pneumonia,normal")
    assert sorted(three["label"]) == ["COVID", "COVID", "normal", "pneumonia"]
    assert three.loc[three["label"] == "COVID", "patient_id"].nunique() == 1
    binary = index_source(root)
    assert sorted(binary["label"]) == ["COVID", "COVID", "non-COVID", "non-COVID"]


def test_kermany_patient_ids_and_merging_with_another_set(tmp_path: Path) -> None:
    kermany = tmp_path / "kermany-normal"
    for name in ("IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "NORMAL2-IM-0007-0001.jpeg"):
        _img(kermany / name, "RGB", (32, 32))
    assert detect_kind(kermany) == "kermany-normal"
    frame = index_source(kermany)
    assert sorted(frame["patient_id"]) == ["kermany/IM-0001", "kermany/IM-0001", "kermany/IM-0007"]
    with pytest.raises(DataError, match="only one class"):
        index_sources([kermany])
    covid = tmp_path / "other"
    _img(covid / "COVID" / "p1" / "x.png")
    merged = index_sources([kermany, covid])
    assert set(merged["source"]) == {"kermany-normal", "other"} and set(merged["label"]) == {"COVID", "non-COVID"}


def _release_names(root: Path, covid: int, noncovid: int) -> None:
    """Empty files named as the sarscov2-ct release names them (detection reads names, not pixels)."""
    for folder, stem, count in (("COVID", "Covid", covid), ("non-COVID", "Non-Covid", noncovid)):
        (root / folder).mkdir(parents=True)
        for i in range(1, count + 1):
            (root / folder / f"{stem} ({i}).png").touch()


def test_sarscov2_is_recognised_by_its_fingerprint_only(tmp_path: Path) -> None:
    release = tmp_path / "download"
    _release_names(release, 1252, 1229)
    assert detect_kind(release) == "sarscov2-ct"
    renamed = tmp_path / "renamed"
    _release_names(renamed, 1252, 1229)
    (renamed / "COVID" / "Covid (7).png").rename(renamed / "COVID" / "scan-7.png")
    assert detect_kind(renamed) == "folder"
    assert detect_kind(tmp_path / "renamed") == "folder"
    subset = tmp_path / "subset"
    _release_names(subset, 300, 300)
    assert detect_kind(subset) == "folder"


def test_a_flat_class_folder_set_is_the_users_own(tmp_path: Path) -> None:
    """A hospital's set laid out as ROOT/COVID + ROOT/non-COVID is never reported as the São Paulo release."""
    root = tmp_path / "moscow"
    _img(root / "COVID" / "study_0001.png", "RGB")
    _img(root / "non-COVID" / "study_0002.png", "RGBA")
    assert detect_kind(root) == "folder"
    frame = index_source(root)
    assert set(frame["source"]) == {"moscow"} and (frame["patient_id"] == "").all()
    named = index_source(root, source="Moscow MosMed 2020")
    assert set(named["source"]) == {"Moscow MosMed 2020"}
    with pytest.raises(DataError, match="must not be empty"):
        index_source(root, source=" ")


def test_sarscov2_layout_and_csv_lists(tmp_path: Path) -> None:
    root = tmp_path / "sars"
    _img(root / "COVID" / "Covid (1).png", "RGB")
    _img(root / "non-COVID" / "Non-Covid (1).png", "RGBA")
    frame = index_source(root, kind="sarscov2-ct")
    assert set(frame["source"]) == {"sarscov2-ct"} and (frame["patient_id"] == "").all()
    with pytest.raises(DataError, match="known set"):
        index_source(root, kind="sarscov2-ct", source="mine")
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,patient_id\nsars/COVID/Covid (1).png,covid,p1\nsars/non-COVID/Non-Covid (1).png,Normal,p2\n")
    listed = index_source(csv)
    assert sorted(listed["label"]) == ["COVID", "non-COVID"] and sorted(listed["patient_id"]) == ["p1", "p2"]
    csv.write_text("path,label\nsars/COVID/Covid (1).png,kitten\n")
    with pytest.raises(DataError, match="kitten"):
        index_source(csv)
