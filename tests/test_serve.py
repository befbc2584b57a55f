"""ONNX export and the torch-free service: parity, routes, error corpus, input gate, privacy, OpenAPI fuzzing."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dicom_helpers import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_dicom


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _slices(tiny_run: Path, split: str = "test", count: int = 3) -> list[Path]:
    import pandas as pd

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    return [Path(p) for p in frame.loc[frame["split"] == split, "path"].tolist()[:count]]


def _photographs() -> dict[str, bytes]:
    from skimage import data

    return {name: _png(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "text")}


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> TestClient:
    from covidscan.serve.app import create_app

    return TestClient(create_app(tiny_bundle))


def test_export_writes_a_bundle_with_measured_parity(tiny_bundle: Path) -> None:
    import onnxruntime as ort

    card = json.loads((tiny_bundle / "model.json").read_text())
    assert card["format"] == "covidscan-onnx-bundle/1" and "not a diagnosis" in card["intended_use"]
    for kind in ("random", "real"):
        assert card["parity"][kind]["max_abs_probability_diff"] < 1e-4
        assert card["parity"][kind]["max_abs_feature_diff"] < 1e-3
    assert card["parity"]["real"]["images"] > 0
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "features", "gate_features"]
    logits, features, gate = session.run(None, {"images": np.zeros((3, 1, 48, 48), np.float32)})
    assert logits.shape == (3, 2) and features.shape[:2] == (3, np.asarray(card["cam"]["weights"]).shape[1]) and gate.shape[0] == 3
    assert card["gate"]["threshold"] > 0 and card["gate"]["validation_images"] > 0


def test_service_never_imports_torch(tiny_bundle: Path, tiny_run: Path) -> None:
    image = _slices(tiny_run)[0]
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from covidscan.serve.app import create_app\n"
        f"client = TestClient(create_app({str(tiny_bundle)!r}))\n"
        f"r = client.post('/api/v1/predict', files=[('files', ('x.png', open({str(image)!r}, 'rb').read(), 'image/png'))])\n"
        "assert r.status_code == 200, r.text\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_health_model_and_page(client: TestClient) -> None:
    assert client.get("/api/v1/health").json()["status"] == "ok"
    model = client.get("/api/v1/model").json()
    assert model["classes"] == ["non-COVID", "COVID"] and "not a diagnosis" in model["intended_use"]
    assert "cam" not in model and "weights" not in model
    page = client.get("/").text
    assert 'for="file"' in page and "not a diagnosis" in page and "http://" not in page and "https://" not in page  # no CDN
    assert client.get("/docs").status_code == 200 and "/api/v1/predict" in client.get("/openapi.json").text


def test_predict_png_matches_the_pytorch_model_and_draws_grad_cam(client: TestClient, tiny_run: Path) -> None:
    from covidscan.data.io import load_resized
    from covidscan.data.transforms import Normaliser
    from covidscan.explain.cam import heatmaps
    from covidscan.predict import Predictor

    path = _slices(tiny_run)[0]
    response = client.post("/api/v1/predict", files=[("files", ("slice.png", path.read_bytes(), "image/png"))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert "not a diagnosis" in body["decision_support"] and body["threshold"] == 0.5
    result = body["results"][0]["slices"][0]
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    predictor = Predictor(tiny_run)
    expected = predictor.probabilities([path])[0]
    assert result["probabilities"]["COVID"] == pytest.approx(float(expected[1]), abs=1e-4)
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"]))))
    assert heat.shape == (48, 48, 4)
    reference = heatmaps(predictor.model, load_resized(path, 48)[None, None], Normaliser(**predictor.card["normalise"]), target_class=1)[0]
    assert np.corrcoef(heat[..., 3].ravel().astype(float), reference.ravel())[0, 1] > 0.98  # alpha channel = heat
    assert "image_png" in result and result["image_png"]
    plain = client.post("/api/v1/predict?heatmap=false", files=[("files", ("slice.png", path.read_bytes(), "image/png"))]).json()
    assert plain["results"][0]["slices"][0]["heatmap_png"] is None


def _ct_dicom(path: Path, gray: np.ndarray) -> Path:
    """A CT DICOM whose lung window shows `gray` (uint8): HU = -1350 + gray/255 * 1500."""
    hu = -1350.0 + gray.astype(np.float64) / 255.0 * 1500.0
    return write_dicom(path, np.round(hu + 1024).astype(np.int16))


def test_dicom_series_gives_slices_and_a_study_without_patient_fields(client: TestClient, tiny_run: Path, tmp_path: Path) -> None:
    files = []
    for i, path in enumerate(_slices(tiny_run, count=3)):
        gray = np.asarray(Image.open(path).convert("L"))
        files.append(("files", (f"{FAKE_PATIENT_NAME}-{i}.dcm", _ct_dicom(tmp_path / f"{i}.dcm", gray).read_bytes(), "application/dicom")))
    response = client.post("/api/v1/predict?study=true", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["kind"] for r in body["results"]] == ["dicom-series"] and len(body["results"][0]["slices"]) == 3  # one series
    assert body["study"]["slices_used"] + body["study"]["slices_refused"] == 3
    from covidscan.decision import aggregate_scores, rule_name

    card = json.loads((tiny_run / "model.json").read_text())  # the rule the report evaluated, not a fixed top-3 mean
    assert body["study"]["rule"] == rule_name(card["study_rule"]) and body["study"]["threshold"] == pytest.approx(card["study_rule"]["threshold"])
    kept = [s["probabilities"]["COVID"] for r in body["results"] for s in r["slices"] if s["in_distribution"]]
    assert kept, "the gate refused every slice: the study rule was not exercised"
    assert body["study"]["probability"] == pytest.approx(aggregate_scores(kept, card["study_rule"]), abs=1e-6)
    text = response.text
    assert FAKE_PATIENT_ID not in text and "19700101" not in text and "Jane" not in text.replace(f"{FAKE_PATIENT_NAME}-", "")
    for number in (1, 3):  # the viewer's images carry no header at all, only pixels
        image = client.get(body["viewer"]["slice_url"].format(n=number))
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG") and FAKE_PATIENT_ID.encode() not in image.content


def test_nifti_volume_gives_per_slice_and_study_results(client: TestClient, tiny_run: Path, tmp_path: Path) -> None:
    import gzip

    import nibabel as nib

    grays = [np.asarray(Image.open(p).convert("L")).astype(np.float32) for p in _slices(tiny_run, count=4)]
    volume = np.stack([np.rot90(np.fliplr(-1350.0 + g / 255.0 * 1500.0), -1) for g in grays], axis=2).astype(np.int16)  # read back as g
    data = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    response = client.post("/api/v1/predict", files=[("files", ("scan.nii.gz", data, "application/gzip"))])
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["kind"] == "nifti.gz" and len(result["slices"]) == 4 and result["study"]["slices_used"] >= 1


BAD_INPUTS = {
    "text": (b"hello, not an image", 415),
    "pdf": (b"%PDF-1.4 fake", 415),
    "empty": (b"", 422),
    "truncated png": (None, 422),
    "bomb": (None, 422),
    "broken dicom": (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage", 422),
    "broken nifti.gz": (b"\x1f\x8b\x08\x00garbage-not-gzip", 422),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_error_corpus_gives_json_4xx_never_500(client: TestClient, tiny_run: Path, name: str) -> None:
    data, status = BAD_INPUTS[name]
    if name == "truncated png":
        data = _slices(tiny_run)[0].read_bytes()[:150]
    if name == "bomb":
        buffer = io.BytesIO()
        Image.new("L", (9000, 9000)).save(buffer, "PNG")  # 81 Mpx in ~80 kB
        data = buffer.getvalue()
    response = client.post("/api/v1/predict", files=[("files", ("../../etc/passwd", data, "image/png"))])
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and "#1" in body["detail"]


def test_size_limit_api_key_and_missing_files(tiny_bundle: Path, tiny_run: Path) -> None:
    from covidscan.serve.app import create_app

    image = _slices(tiny_run)[0].read_bytes()
    small = TestClient(create_app(tiny_bundle, max_upload_mb=0.001))
    response = small.post("/api/v1/predict", files=[("files", ("x.png", image * 3, "image/png"))])
    assert response.status_code == 413 and response.json()["error"] == "payload too large"
    locked = TestClient(create_app(tiny_bundle, api_key="s3cret"))
    assert locked.post("/api/v1/predict", files=[("files", ("x.png", image, "image/png"))]).status_code == 401
    assert locked.get("/api/v1/model").status_code == 401
    assert locked.get("/api/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert locked.get("/api/v1/health").status_code == 200
    missing = locked.post("/api/v1/predict", headers={"X-API-Key": "s3cret"})
    assert missing.status_code == 422 and missing.json()["error"] == "invalid request"
    assert "access-control-allow-origin" not in locked.get("/api/v1/health", headers={"Origin": "http://evil.example"}).headers


def test_input_gate_refuses_photographs_and_accepts_real_test_slices(client: TestClient, tiny_run: Path) -> None:
    refused = 0
    for name, data in _photographs().items():
        response = client.post("/api/v1/predict", files=[("files", (f"{name}.png", data, "image/png"))])
        assert response.status_code in (200, 422)
        if response.status_code == 422:
            assert response.json()["error"] == "unlike the training data"
            refused += 1
    assert refused == len(_photographs())
    accepted = 0
    tests = _slices(tiny_run, count=24)
    for path in tests:
        response = client.post("/api/v1/predict?heatmap=false", files=[("files", ("s.png", path.read_bytes(), "image/png"))])
        accepted += response.status_code == 200
    assert accepted / len(tests) >= 0.9


def test_openapi_fuzzing_finds_no_server_error(tiny_bundle: Path) -> None:
    """Schemathesis generates requests from the OpenAPI schema; no response may be a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    from covidscan.serve.app import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(tiny_bundle))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/health", "/api/v1/model", "/api/v1/predict"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()


def test_large_uploads_stay_in_memory(tiny_bundle: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 MB upload (over Starlette's 1 MB spool size) must not touch the disk."""
    import tempfile

    from covidscan.serve.app import create_app

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was written to a temporary file")

    client = TestClient(create_app(tiny_bundle))
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    gray = np.asarray(Image.open(_slices(tiny_run)[0]).convert("L").resize((1800, 1800)))
    noisy = (gray.astype(np.int16) + np.random.default_rng(0).integers(-20, 20, gray.shape)).clip(0, 255).astype(np.uint8)
    data = _png(noisy)
    assert len(data) > 2_000_000
    response = client.post("/api/v1/predict?heatmap=false", files=[("files", ("big.png", data, "image/png"))])
    assert response.status_code in (200, 422), response.text  # answered, whatever the gate says


def test_int8_graph_is_quantised_and_judged_against_fp32(tiny_bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    import onnx

    from covidscan.export.quantize import acceptable, int8_agreement, quantize_int8

    images = np.stack([np.asarray(Image.open(p).convert("L"), np.float32)[None] / 255.0 for p in _slices(tiny_run, count=8)])
    labels = np.array([0, 1] * 4)
    same = int8_agreement(tiny_bundle / "model.onnx", tiny_bundle / "model.onnx", images, labels, 1.0)
    assert same["label_agreement"] == 1.0 and same["max_abs_probability_diff"] == 0.0 and acceptable(same)[0]
    quantize_int8(tiny_bundle / "model.onnx", tmp_path / "int8.onnx", images)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    check = int8_agreement(tiny_bundle / "model.onnx", tmp_path / "int8.onnx", images, labels, 1.0)
    assert 0.0 <= check["label_agreement"] <= 1.0 and check["images"] == 8
    ok, why = acceptable({"label_agreement": 0.64, "auc_fp32": 0.967, "auc_int8": 0.796})
    assert not ok and "36.0% of decisions" in why
    ok, why = acceptable({"label_agreement": 1.0, "auc_fp32": 0.967, "auc_int8": 0.90})
    assert not ok and "0.967 to 0.900" in why
