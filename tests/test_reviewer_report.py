"""What a reviewer reads around the statistics: counts, gated figures, error analysis, the audit, the data description."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidscan.config import EvaluateConfig, load_config
from covidscan.data.manifest import load_manifest, part_counts
from covidscan.data.summary import data_summary
from covidscan.evaluate.evaluation import (
    EVALUABLE_SHARE, error_analysis, evaluability, gallery_picks, gate_check, score_set, set_summary,
)
from covidscan.evaluate.intervals import clustered_proportion
from covidscan.evaluate.report import write_report
from test_split import _patients_as_vectors


def _frame(patients: int, per_patient: int, split: list[str] | None = None) -> pd.DataFrame:
    rows = [{"path": f"/d/p{p}-{k}.png", "label": "COVID" if p % 2 else "non-COVID", "patient_id": f"MRN{p:07d}", "group": "",
             "source": "mine", "split": "", "slice_index": ""} for p in range(patients) for k in range(per_patient)]
    frame = pd.DataFrame(rows)
    if split is not None:
        frame["split"] = [split[p % len(split)] for p in range(patients) for _ in range(per_patient)]
    return frame


def test_counts_are_patients_or_groups_for_every_split_origin() -> None:
    """A split given in the manifest has no group column: each part was once counted as one patient."""
    from covidscan.data.split import split_manifest

    given = _frame(30, 3, ["train", "train", "val", "test"])
    counts = part_counts(given)
    assert counts["train"] == {"images": 48, "patients_or_groups": 16}
    assert counts["val"]["patients_or_groups"] == 7 and counts["test"]["patients_or_groups"] == 7
    assert data_summary(given)["by_split"] == counts
    by_patient, _ = split_manifest(_frame(30, 3), "patient", np.random.default_rng(0).normal(size=(90, 8)), 0.2, 0.2, 0, where="m")
    assert sum(c["patients_or_groups"] for c in part_counts(by_patient).values()) == 30
    for part, c in part_counts(by_patient).items():
        assert c["patients_or_groups"] == by_patient.loc[by_patient["split"] == part, "patient_id"].nunique()
    no_ids, scans = _patients_as_vectors(30, 3)
    by_cluster, _ = split_manifest(no_ids, "cluster", scans, 0.2, 0.2, 0, where="m")
    for part, c in part_counts(by_cluster).items():
        assert c["patients_or_groups"] == by_cluster.loc[by_cluster["split"] == part, "group"].nunique() > 1
    images_only = no_ids.assign(split=["train", "val", "test"] * 30)
    assert part_counts(images_only)["test"]["patients_or_groups"] == 30  # no IDs, no groups: each image is its own unit


def test_the_report_and_card_state_the_manifest_counts(tiny_run: Path) -> None:
    frame = load_manifest(tiny_run / "manifest.csv")
    card = json.loads((tiny_run / "model.json").read_text())
    assert card["training_data"]["by_split"] == part_counts(frame)
    train = part_counts(frame)["train"]
    page = (tiny_run / "report.html").read_text()
    assert f"{train['images']} images of {train['patients_or_groups']} patients/groups" in page


def test_a_given_split_is_described_without_a_seed(tiny_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    metrics["split"].update(by="given in the manifest", seed="")
    page = write_report(tmp_path / "r.html", metrics, [], load_config(tiny_run / "config.yaml"), tiny_run).read_text()
    assert "the split given in the manifest" in page and "(seed )" not in page and "By given" not in page


def _gated_external(tiny_run: Path, refused_share: float) -> dict[str, object]:
    """The tiny run's test images scored as an external set whose gate refuses `refused_share` of them."""
    frame = load_manifest(tiny_run / "manifest.csv")
    part = pd.concat([frame] * 3, ignore_index=True).assign(patient_id=lambda f: f["patient_id"] + "-" + (f.index // len(frame)).astype(str),
                                                              group="")
    rng = np.random.default_rng(0)
    y = (part["label"] == "COVID").to_numpy()
    raw = np.clip(np.where(y, 0.7, 0.3) + rng.normal(0, 0.2, len(part)), 0.01, 0.99)
    probs = np.stack([1 - raw, raw], 1)
    distances = np.where(rng.random(len(part)) < refused_share, 10.0, 1.0)
    card = json.loads((tiny_run / "model.json").read_text())
    result = score_set(part, probs, distances, ["non-COVID", "COVID"], card, 5.0, EvaluateConfig(bootstrap=0), 0)
    result.update(kind="external", sources=["hospital-x"], evaluable=evaluability(result["gate"]))  # type: ignore[arg-type]
    return result


def test_an_external_set_the_gate_mostly_refuses_is_not_evaluable(tiny_run: Path, tmp_path: Path) -> None:
    """Demo headline before: 'slice AUC 1.000 after the gate refused 90 of its images ... (+11.8 points)'."""
    sliver = _gated_external(tiny_run, 0.9)
    assert sliver["evaluable"]["evaluable"] is False and sliver["gate"]["refused"] > (1 - EVALUABLE_SHARE) * 144  # type: ignore[index]
    fair = _gated_external(tiny_run, 0.05)
    assert fair["evaluable"]["evaluable"] is True  # type: ignore[index]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    metrics["evaluation"]["sets"]["hospital-x"] = sliver
    metrics["evaluation"]["sets"]["hospital-y"] = fair
    page = write_report(tmp_path / "r.html", metrics, [], load_config(tiny_run / "config.yaml"), tiny_run).read_text()
    assert "<strong>hospital-x</strong> is <strong>not evaluable with this model</strong>" in page
    assert "On <strong>hospital-x</strong> the slice AUC" not in page  # never read as a gain or a loss
    assert "On <strong>hospital-y</strong> the slice AUC" in page and "images the gate accepted" in page
    card = page[page.index('id="model-card"'):]
    refused = sliver["gate"]["refused"]  # type: ignore[index]
    assert f"hospital-x: not evaluable with this model ({refused} (" in card
    assert f"the input gate refused {refused} (" in card and "hospital-x's images; that set is not evaluable" in card
    assert set_summary("hospital-x", sliver).startswith("hospital-x: NOT EVALUABLE with this model")
    assert "NOT EVALUABLE" not in set_summary("hospital-y", fair)


def test_an_in_domain_gate_refusing_beyond_its_target_is_called_miscalibrated() -> None:
    labels = np.repeat(np.arange(20), 5).astype(str)
    many = gate_check({"refusal_rate": clustered_proportion(np.arange(100) < 6, labels)})
    assert many["miscalibrated"] is True and many["target"] == pytest.approx(0.005)
    none = gate_check({"refusal_rate": {"value": 0.0, "low": 0.0, "high": 0.05}})
    assert none["miscalibrated"] is False


def test_error_analysis_lists_the_worst_patients_keyed_and_the_confident_errors() -> None:
    frame = _frame(4, 3)  # patients 0, 2 non-COVID; 1, 3 COVID
    y = (frame["label"] == "COVID").to_numpy()
    score = np.array([0.9, 0.8, 0.6,   # p0 non-COVID: 3 wrong
                      0.9, 0.4, 0.8,   # p1 COVID: 1 wrong
                      0.1, 0.2, 0.3,   # p2: none
                      0.95, 0.01, 0.9])  # p3 COVID: 1 wrong, the most confident error of all
    errors = error_analysis(frame, y, score, ["non-COVID", "COVID"])
    assert errors["errors"] == 5 and errors["units_with_errors"] == 3 and errors["unit"] == "patients"
    worst = errors["worst"]
    assert [w["errors"] for w in worst] == [3, 1, 1] and worst[0]["true"] == "non-COVID" and worst[0]["share"] == 1.0
    assert [s["p_positive"] for s in worst[0]["wrong_slices"]] == [0.9, 0.8, 0.6]  # most confident first
    assert errors["confident_errors"][0]["p_positive"] == 0.01 and errors["confident_errors"][0]["true"] == "COVID"
    shown = json.dumps(errors)
    assert "MRN" not in shown and worst[0]["unit"].startswith("pk-")  # patients keyed, never their IDs


def test_the_gallery_shows_one_slice_per_patient_per_cell() -> None:
    y = np.array([True] * 6)
    score = np.array([0.99, 0.98, 0.97, 0.7, 0.6, 0.55])
    units = np.array(["a", "a", "a", "b", "c", "d"])
    assert gallery_picks(y, score, 0.5, 3, units)["TP"] == [0, 3, 4]
    assert gallery_picks(y, score, 0.5, 3)["TP"] == [0, 1, 2]


def test_the_report_of_a_run_lists_its_errors_without_patient_ids(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    page = (tiny_run / "report.html").read_text()
    errors = metrics["evaluation"]["sets"]["in-domain test"]["errors"]
    assert errors["images"] == metrics["evaluation"]["sets"]["in-domain test"]["n"]
    if errors["errors"]:
        assert 'id="errors"' in page and all(w["unit"] in page for w in errors["worst"])
    else:
        assert "No wrong slice" in page
    patients = set(load_manifest(tiny_run / "manifest.csv")["patient_id"])
    assert not any(f">{p}<" in page for p in patients)


def test_a_shortcut_found_by_the_audit_reaches_the_report_and_the_card(tiny_phantom: Path, tiny_run: Path, tmp_path: Path) -> None:
    """UCSD's RGBA-means-COVID shortcut (audit AUC 0.75) never reached the report of a model trained on that set."""
    from covidscan.data.sources import index_folder
    from covidscan.data.summary import training_audit

    root = tmp_path / "shortcut"
    for image in tiny_phantom.rglob("*.png"):
        target = root / image.relative_to(tiny_phantom)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).convert("RGB" if image.parts[-3] == "COVID" else "L").save(target)
    frame = index_folder(root)
    logged: list[str] = []
    audit = training_audit(frame, True, tmp_path, False, logged.append)
    assert (tmp_path / "audit.json").is_file() and any("SHORTCUT RISK" in line for line in logged)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    metrics["data"] = data_summary(frame, audit)
    page = write_report(tmp_path / "r.html", metrics, [], load_config(tiny_run / "config.yaml"), tiny_run).read_text()
    assert "SHORTCUT RISK: file property &#x27;mode&#x27;" in page[page.index('id="audit"'):]
    card = page[page.index('id="model-card"'):]
    assert "the data audit found a shortcut: the file property 'mode' alone separates the classes (AUC 1.00)" in card
    assert "fairness across demographic groups cannot be checked" in card
    skipped = copy.deepcopy(metrics)
    skipped["data"] = data_summary(frame, training_audit(frame, False, tmp_path, False, logged.append))
    page = write_report(tmp_path / "s.html", skipped, [], load_config(tiny_run / "config.yaml"), tiny_run).read_text()
    assert "audit was skipped" in page and "were not audited for shortcuts" in page


def test_a_training_run_records_its_audit(tiny_run: Path) -> None:
    audit = json.loads((tiny_run / "model.json").read_text())["training_data"]["audit"]
    assert audit["checked"] is True and audit["images"] == len(load_manifest(tiny_run / "manifest.csv"))
    assert (tiny_run / "audit.json").is_file() and 'id="audit"' in (tiny_run / "report.html").read_text()


def test_the_data_description_states_the_reference_standard_and_what_cannot_be_checked(tiny_run: Path) -> None:
    from covidscan.data.public_sets import describe_set

    known = describe_set(pd.DataFrame({"path": ["a"], "label": ["COVID"], "source": ["ucsd-covid-ct"]}))
    assert "source paper" in known["provenance"]["ucsd-covid-ct"]["label_source"]  # type: ignore[index]
    assert "fairness" in str(known["cannot_check"])
    own = describe_set(pd.DataFrame({"path": ["a"], "label": ["COVID"], "source": ["mine"], "source_description": ["Hospital X, 2021, RT-PCR"],
                                     "age": ["61"], "sex": ["F"], "manufacturer": ["SIEMENS"]}))
    assert own["provenance"]["mine"]["description"] == "Hospital X, 2021, RT-PCR" and own["cannot_check"] == ""  # type: ignore[index]
    assert own["columns"] == ["age", "label", "manufacturer", "sex", "source"]
    page = (tiny_run / "report.html").read_text()
    assert "Reference standard (label source)" in page and "cannot be checked" in page
