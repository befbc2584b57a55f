"""Several bundles behind one service: each upload answered by the model of its modality, and named in the answer."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dicom_helpers import write_dicom


def _copy(bundle: Path, folder: Path, modality: str, refuse_everything: bool = False) -> Path:
    """The tiny bundle under another name, its card saying which modality it was trained on; `refuse_everything`
    shrinks its gate threshold so that its gate refuses every image (the other bundle's gate must then win)."""
    shutil.copytree(bundle, folder)
    card = json.loads((folder / "model.json").read_text())
    card["training_data"]["modality"] = modality
    if refuse_everything:
        card["gate"]["threshold"] = 1e-6
    (folder / "model.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def bundles(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    return {
        "ct": _copy(tiny_bundle, root / "ct", "CT"),
        "cxr": _copy(tiny_bundle, root / "cxr", "CXR"),
        "ct-blind": _copy(tiny_bundle, root / "ct-blind", "CT", refuse_everything=True),
        "cxr-blind": _copy(tiny_bundle, root / "cxr-blind", "CXR", refuse_everything=True),
    }


def _slice_png(tiny_run: Path) -> bytes:
    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    path = frame.loc[frame["split"] == "test", "path"].iloc[0]
    out = io.BytesIO()
    Image.open(path).convert("L").save(out, "PNG")
    return out.getvalue()


def _dicom(tiny_run: Path, folder: Path, modality: str) -> bytes:
    gray = np.asarray(Image.open(io.BytesIO(_slice_png(tiny_run))), np.float32)
    return write_dicom(folder / f"{modality}.dcm", np.round(-1350.0 + gray / 255.0 * 1500.0 + 1024), modality=modality).read_bytes()


def _post(client: TestClient, name: str, data: bytes) -> dict:
    response = client.post("/api/v1/predict", files=[("files", (name, data, "application/octet-stream"))])
    assert response.status_code == 200, response.text
    return response.json()


def test_dicom_goes_to_the_model_of_its_modality_tag_and_the_answer_names_it(bundles: dict[str, Path], tiny_run: Path, tmp_path: Path) -> None:
    from covidscan.serve.app import create_app

    client = TestClient(create_app([bundles["ct"], bundles["cxr"]]))
    listed = client.get("/api/v1/models").json()
    assert [(m["name"], m["modality"]) for m in listed] == [("ct", "CT"), ("cxr", "CXR")]
    assert all("not a diagnosis" in m["intended_use"] for m in listed)
    assert client.get("/api/v1/health").json()["models"].keys() == {"ct", "cxr"}
    for tag, expected in (("CT", "ct"), ("DX", "cxr"), ("CR", "cxr")):
        body = _post(client, f"slice-{tag}.dcm", _dicom(tiny_run, tmp_path, tag))
        model = body["results"][0]["model"]
        assert (model["name"], model["routed_by"]) == (expected, "DICOM Modality tag") and body["model"] == expected
        assert set(body["results"][0]["slices"][0]["probabilities"]) == set(model["classes"])


def test_plain_images_go_to_the_model_whose_gate_accepts_them(bundles: dict[str, Path], tiny_run: Path) -> None:
    from covidscan.serve.app import create_app

    png = _slice_png(tiny_run)
    for served, expected in (([bundles["ct"], bundles["cxr-blind"]], "ct"), ([bundles["ct-blind"], bundles["cxr"]], "cxr")):
        body = _post(TestClient(create_app(served)), "slice.png", png)
        assert body["results"][0]["model"]["name"] == expected and body["results"][0]["model"]["routed_by"] == "input gates"
    # both gates refuse: the refusal names the closest model; no prediction
    response = TestClient(create_app([bundles["ct-blind"], bundles["cxr-blind"]])).post(
        "/api/v1/predict", files=[("files", ("slice.png", png, "image/png"))])
    assert response.status_code == 422 and "any served model" in response.json()["detail"] and "slice.png" in response.json()["detail"]


def test_a_modality_no_served_model_knows_is_refused_by_name(bundles: dict[str, Path], tiny_run: Path, tmp_path: Path) -> None:
    from covidscan.serve.app import create_app

    client = TestClient(create_app(bundles["ct"]))
    response = client.post("/api/v1/predict", files=[("files", ("xray.dcm", _dicom(tiny_run, tmp_path, "DX"), "application/dicom"))])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "xray.dcm" in detail and "chest X-ray" in detail and "ct (chest CT)" in detail and "no prediction" in detail
    # one file of a mixed request: the other file's result stands
    both = client.post("/api/v1/predict", files=[("files", ("xray.dcm", _dicom(tiny_run, tmp_path, "DX"), "application/dicom")),
                                                 ("files", ("ct.dcm", _dicom(tiny_run, tmp_path, "CT"), "application/dicom"))])
    assert both.status_code == 200
    results = both.json()["results"]
    assert results[0]["error"]["error"] == "no model for this modality" and results[1]["model"]["name"] == "ct"


def test_two_models_of_one_modality_are_refused_at_start(bundles: dict[str, Path]) -> None:
    from covidscan.errors import CovidscanError
    from covidscan.serve.app import create_app

    with pytest.raises(CovidscanError, match="two bundles were trained on chest CT: ct and ct-blind"):
        create_app([bundles["ct"], bundles["ct-blind"]])


def test_training_records_the_manifest_modality() -> None:
    from covidscan.pipeline import training_modality

    assert training_modality(pd.DataFrame({"modality": ["CXR", "CXR"]})) == "CXR"
    assert training_modality(pd.DataFrame({"modality": ["CT", "CXR"]})) == ""  # mixed: unknown, routed by the gates only
    assert training_modality(pd.DataFrame({"path": ["a.png"]})) == ""


def test_a_dicom_study_goes_wholly_to_the_model_of_its_modality(bundles: dict[str, Path], tiny_run: Path, tmp_path: Path) -> None:
    from pydicom import dcmread

    from covidscan.serve.app import create_app
    from dicom_helpers import phantom_series

    series = phantom_series(tiny_run, tmp_path / "s", 4)
    client = TestClient(create_app([bundles["cxr"], bundles["ct"]]))  # the CT model is not the first one
    response = client.post("/api/v1/predict?study=true", files=[("files", (p.name, p.read_bytes(), "application/dicom")) for p in series])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "ct" and body["results"][0]["model"]["routed_by"] == "DICOM Modality tag" and body["viewer"]["slices"] == 4
    for path in series:  # the same series as chest radiographs: the X-ray model answers
        ds = dcmread(path)
        ds.Modality = "CR"
        ds.save_as(path)
    response = client.post("/api/v1/predict?study=true", files=[("files", (p.name, p.read_bytes(), "application/dicom")) for p in series])
    assert response.status_code == 200 and response.json()["model"] == "cxr"


@pytest.mark.parametrize("modality", ["MR", "US", "PT", "NM", "XA", "MG"])
def test_a_modality_no_served_model_knows_is_refused_by_name(bundles: dict[str, Path], tiny_run: Path, tmp_path: Path, modality: str) -> None:
    """A CT slice tagged MR (US, PT, ...) with only a CT model served: 422 naming the modality, never the CT model's
    answer (before: 200, 'COVID', 'the only model served')."""
    from covidscan.serve.app import create_app

    client = _client_for([bundles["ct"]], create_app)
    response = client.post("/api/v1/predict", files=[("files", ("x.dcm", _dicom(tiny_run, tmp_path, modality), "application/dicom"))])
    assert response.status_code == 422 and response.json()["error"] == "no model for this modality", response.text
    assert f"DICOM modality {modality}" in response.json()["detail"]


_CLIENTS: dict[tuple[str, ...], TestClient] = {}


def _client_for(folders: list[Path], create_app: object) -> TestClient:
    key = tuple(map(str, folders))
    if key not in _CLIENTS:
        _CLIENTS[key] = TestClient(create_app(folders))  # type: ignore[operator]
    return _CLIENTS[key]


def test_a_zip_study_uses_the_series_a_served_model_can_analyse(bundles: dict[str, Path], tiny_run: Path, tmp_path: Path) -> None:
    """3 CT slices and a 4-image CR series in one zip, a CT model served: the CT series is analysed (it has fewer
    slices) and the CR series is reported as skipped with the reason (before: 422, the CR series was chosen)."""
    import zipfile

    from pydicom import dcmread

    from covidscan.serve.app import create_app
    from dicom_helpers import phantom_series

    ct = phantom_series(tiny_run, tmp_path / "ct", 3)
    cr = phantom_series(tiny_run, tmp_path / "cr", 4)
    for index, path in enumerate(cr):
        ds = dcmread(path)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.StudyInstanceUID = "CR", "1.2.826.0.1.3680043.99.1", 7, dcmread(ct[0]).StudyInstanceUID
        ds.save_as(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in ct + cr:
            archive.write(path, f"{path.parent.name}/{path.name}")
    response = _client_for([bundles["ct"]], create_app).post("/api/v1/predict", files=[("files", ("study.zip", buffer.getvalue(), "application/zip"))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["viewer"]["slices"] == 3 and body["model"] == "ct"
    skipped = json.dumps(body)
    assert "modality CXR: no model served for it" in skipped


def test_the_same_bundle_given_twice_is_refused_at_start(bundles: dict[str, Path]) -> None:
    from covidscan.errors import CovidscanError
    from covidscan.serve.app import create_app

    with pytest.raises(CovidscanError, match="the same bundle is given twice"):
        create_app([bundles["ct"], bundles["ct"] / ".." / "ct"])


def test_every_answer_leaves_one_audit_line_without_patient_fields(bundles: dict[str, Path], tiny_run: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from covidscan.serve.app import create_app
    from dicom_helpers import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, phantom_series

    caplog.set_level(logging.INFO, logger="covidscan.audit")
    client = _client_for([bundles["ct"]], create_app)
    series = phantom_series(tiny_run, tmp_path / "s", 4)
    study = client.post("/api/v1/predict?study=true", files=[("files", (p.name, p.read_bytes(), "application/dicom")) for p in series])
    single = client.post("/api/v1/predict", files=[("files", ("x.png", _slice_png(tiny_run), "image/png"))])
    assert study.status_code == 200 and single.status_code == 200, single.text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "covidscan.audit"]
    assert [line["source"] for line in lines] == ["service", "service"] and all(line["study"].startswith("ch-") for line in lines)
    assert lines[0]["slices"] == 4 and lines[0]["answer"] == study.json()["study"]["label"] and "study rule" in lines[0]["operating_point"]
    assert lines[1]["slices"] == 1 and "slice threshold" in lines[1]["operating_point"] and lines[0]["study"] != lines[1]["study"]
    assert lines[0]["model"] == "ct" and lines[0]["model_version"] == study.json()["model_version"]
    text = json.dumps(lines)
    assert FAKE_PATIENT_ID not in text and FAKE_PATIENT_NAME.split("^")[0] not in text
