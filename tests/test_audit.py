"""The audit finds what fools models: corrupt files, duplicates, quality outliers, shortcuts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.data.audit import AuditThresholds, drop_flagged, near_duplicate_pairs, run_audit
from covidscan.data.audit_report import write_audit
from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset
from covidscan.data.sources import index_folder


def _rewrite_modes(root: Path, covid_mode: str, other_mode: str) -> None:
    for path in root.rglob("*.png"):
        mode = covid_mode if path.parts[-3] == "COVID" else other_mode
        Image.open(path).convert(mode).save(path)


@pytest.fixture()
def phantom(tmp_path: Path) -> Path:
    return generate_phantom_dataset(tmp_path / "data", PhantomSpec(patients_per_class=6, slices_per_patient=3, image_size=64, seed=5))


def test_clean_phantom_has_no_shortcut_warning(phantom: Path) -> None:
    result = run_audit(index_folder(phantom), show=False)
    assert not any("SHORTCUT" in w for w in result.summary["warnings"])
    assert result.summary["exact_duplicates"] == [] and result.summary["corrupt"] == []


def test_file_mode_that_differs_by_class_is_a_shortcut_warning(phantom: Path) -> None:
    _rewrite_modes(phantom, "RGB", "RGBA")
    result = run_audit(index_folder(phantom), show=False)
    mode = next(r for r in result.summary["shortcut_risks"] if r["property"] == "mode")
    assert mode["warning"] and mode["auc"] > 0.95
    assert any("'mode'" in w for w in result.summary["warnings"])


def test_partial_mode_shortcut_is_caught_by_the_purity_rule(tmp_path: Path) -> None:
    """Like sarscov2-ct as released: some COVID files RGB, everything else RGBA."""
    phantom = generate_phantom_dataset(tmp_path, PhantomSpec(patients_per_class=12, slices_per_patient=3, image_size=48, seed=2))
    _rewrite_modes(phantom, "RGBA", "RGBA")
    for path in sorted((phantom / "COVID").rglob("*.png"))[:10]:
        Image.open(path).convert("RGB").save(path)
    mode = next(r for r in run_audit(index_folder(phantom), show=False).summary["shortcut_risks"] if r["property"] == "mode")
    assert mode["auc"] < 0.70  # too weak for the AUC rule alone ...
    assert mode["warning"] and mode["rules"][0]["value"] == "RGB" and mode["rules"][0]["class"] == "COVID"


def test_corrupt_dark_and_duplicate_images_are_flagged_and_can_be_dropped(phantom: Path) -> None:
    covid = sorted((phantom / "COVID").rglob("*.png"))
    other = sorted((phantom / "non-COVID").rglob("*.png"))
    covid[0].write_bytes(b"broken")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(covid[1])
    shutil.copy(covid[2], covid[3].parent / "copy.png")  # same class duplicate
    shutil.copy(covid[4], other[0].parent / "conflict.png")  # the same image labelled both ways
    result = run_audit(index_folder(phantom), show=False)
    props = result.properties.set_index("path")
    assert props.loc[str(covid[0]), "audit_flags"] == "corrupt"
    assert "too dark" in props.loc[str(covid[1]), "audit_flags"]
    assert props.loc[str(covid[3].parent / "copy.png"), "audit_flags"] == "duplicate"
    assert "conflict" in props.loc[str(other[0].parent / "conflict.png"), "audit_flags"]
    assert "conflict" in props.loc[str(covid[4]), "audit_flags"]
    groups = result.summary["exact_duplicates"]
    assert len(groups) == 2 and sum(g["cross_class"] for g in groups) == 1

    clean, dropped = drop_flagged(result.properties, ["corrupt", "duplicate", "conflict"])
    assert dropped == {"corrupt": 1, "duplicate": 1, "conflict": 2}
    assert len(clean) == len(result.properties) - 4


def test_near_duplicate_pairs_by_hamming_distance() -> None:
    a = "00" * 32
    b = "01" + "00" * 31  # 1 bit away
    c = "ff" * 32  # 256 bits away
    assert near_duplicate_pairs([a, b, c], 4).tolist() == [[0, 1]]
    assert near_duplicate_pairs([a, b, c], 0).tolist() == []


def test_report_files(phantom: Path, tmp_path: Path) -> None:
    _rewrite_modes(phantom, "RGB", "L")
    result = run_audit(index_folder(phantom), AuditThresholds(), show=False)
    paths = write_audit(result, tmp_path / "audit", "phantom", dropped={"corrupt": 0})
    summary = json.loads(paths["json"].read_text())
    assert summary["images"] == 36 and summary["dropped"] == {"corrupt": 0}
    page = paths["html"].read_text()
    for section in ("Warnings", "Shortcut risks", "Exact duplicates", "Near duplicates", "Class balance", "Excluded"):
        assert section in page
    assert "SHORTCUT RISK" in page
    assert paths["manifest"].read_text().splitlines()[0].startswith("path,label")
