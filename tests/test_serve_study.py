"""The service on whole CT studies as a PACS exports them: many extension-less compressed slices, or a zip."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cli_runner import run_cli
from dicom_helpers import FAKE_PATIENT_ID, LOSSLESS_SYNTAXES, phantom_series, write_ct_series


@pytest.fixture(scope="module")
def study_client(tiny_bundle: Path) -> TestClient:
    from covidscan.serve.app import create_app

    return TestClient(create_app(tiny_bundle))


def _upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def test_a_compressed_extension_less_series_is_one_study_in_body_order_with_refused_slices_marked(
    study_client: TestClient, tiny_run: Path, tmp_path: Path
) -> None:
    """The issue's defects: upload order, a refused slice aborting the study, 0-based numbers, compressed files."""
    series = phantom_series(tiny_run, tmp_path / "s", 12)
    noise = (np.random.default_rng(0).integers(0, 4095, (1, 64, 64))).astype(np.uint16)  # one slice unlike any CT
    odd = write_ct_series(tmp_path / "odd", noise, series_uid="9.9.9", shuffle_seed=None)[0]
    # the odd slice belongs to the series (same UID) and lies in the middle of it
    from pydicom import dcmread

    ds, middle = dcmread(odd), dcmread(series[6])
    ds.SeriesInstanceUID, ds.ImagePositionPatient, ds.InstanceNumber = middle.SeriesInstanceUID, middle.ImagePositionPatient, 99
    ds.save_as(odd)
    scout = write_ct_series(tmp_path / "scout", noise, series_uid=str(middle.SeriesInstanceUID), shuffle_seed=None,
                            image_type="ORIGINAL\\PRIMARY\\LOCALIZER")[0]
    uploads = sorted(series + [odd, scout], key=lambda p: p.name)  # the browser's order: by name
    response = study_client.post("/api/v1/predict?study=true", files=_upload(uploads))
    assert response.status_code == 200, response.text
    body = response.json()
    assert FAKE_PATIENT_ID not in response.text and "Doe" not in response.text and "19700101" not in response.text
    study, slices = body["study"], body["results"][0]["slices"]
    assert body["results"][0]["kind"] == "dicom-series" and len(slices) == 13
    assert [s["number"] for s in slices] == list(range(1, 14))
    # head first, by position; the odd slice shares series[6]'s position and the lower instance number goes first
    expected = [p.name for p in series[:7]] + [odd.name] + [p.name for p in series[7:]]
    assert [s["source"].split(" ", 1)[1] for s in slices] == expected
    assert study["order"] == "position" and study["slices_used"] + study["slices_refused"] == 13
    assert not slices[7]["in_distribution"] and study["slices_refused"] >= 1 and study["slices_used"] >= 6
    assert study["label"] in ("COVID", "non-COVID") and 0 <= study["probability"] <= 1
    assert [s["detail"] for s in study["skipped"]] == ["scout / localizer image"]
    assert "not a diagnosis" in body["decision_support"]
    viewer = body["viewer"]
    assert viewer["slices"] == 13 and viewer["windows"] == ["lung", "mediastinum", "bone"]
    lung = study_client.get(viewer["slice_url"].format(n=1) + "?window=lung")
    soft = study_client.get(viewer["slice_url"].format(n=1) + "?window=mediastinum")
    assert lung.headers["content-type"] == "image/png" and lung.content != soft.content
    lung_px, soft_px = (np.asarray(Image.open(io.BytesIO(r.content))) for r in (lung, soft))
    assert lung_px.shape == (256, 256) and (soft_px == 0).mean() > (lung_px == 0).mean()  # narrow window: more black
    heat = Image.open(io.BytesIO(study_client.get(viewer["heatmap_url"].format(n=1)).content))
    assert heat.mode == "RGBA" and heat.size == (256, 256)
    missing = study_client.get(viewer["slice_url"].format(n=14))
    assert missing.status_code == 404 and "slices 1 to 13" in missing.json()["detail"]
    assert study_client.get("/api/v1/studies/unknown/slices/1.png").status_code == 404


def test_a_zip_of_a_dicom_folder_gives_the_same_study(study_client: TestClient, tiny_run: Path, tmp_path: Path) -> None:
    series = phantom_series(tiny_run, tmp_path / "s", 6, LOSSLESS_SYNTAXES["rle"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for p in series:
            archive.write(p, f"EXPORT/{p.name}")
        archive.writestr("EXPORT/DICOMDIR", b"\0" * 128 + b"DICM")
    from_zip = study_client.post("/api/v1/predict", files=[("files", ("study.zip", buffer.getvalue(), "application/zip"))]).json()
    from_files = study_client.post("/api/v1/predict?study=true", files=_upload(series)).json()
    assert [s["probabilities"] for s in from_zip["results"][0]["slices"]] == [s["probabilities"] for s in from_files["results"][0]["slices"]]
    assert from_zip["study"]["probability"] == pytest.approx(from_files["study"]["probability"])
    assert "DICOMDIR" in from_zip["study"]["skipped"][0]["detail"]


def test_png_slices_of_a_study_mark_a_refused_slice_instead_of_failing(study_client: TestClient, tiny_run: Path) -> None:
    import pandas as pd
    from skimage import data

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    pngs = [Path(p).read_bytes() for p in frame.loc[frame["split"] == "test", "path"].tolist()[:3]]
    cat = io.BytesIO()
    Image.fromarray(data.chelsea()).save(cat, format="PNG")
    files = [("files", (f"s{i}.png", d, "image/png")) for i, d in enumerate(pngs)] + [("files", ("cat.png", cat.getvalue(), "image/png"))]
    response = study_client.post("/api/v1/predict?study=true&heatmap=false", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][3]["error"] is None and body["results"][3]["slices"][0]["in_distribution"] is False
    assert body["study"]["slices_refused"] >= 1


def test_default_limits_take_a_300_slice_study() -> None:
    """The 64-file and 50 MB limits rejected realistic studies (413), in the app and in both serve commands."""
    import inspect

    from covidscan import cli
    from covidscan.serve import DEFAULT_MAX_UPLOAD_MB, app
    from covidscan.serve.__main__ import run_server

    assert app.MAX_FILES >= 300 and DEFAULT_MAX_UPLOAD_MB * 1e6 >= 300 * (512 * 512 * 2 + 2000)
    assert inspect.signature(app.create_app).parameters["max_upload_mb"].default == DEFAULT_MAX_UPLOAD_MB
    assert inspect.signature(run_server).parameters["max_upload_mb"].default == DEFAULT_MAX_UPLOAD_MB
    assert inspect.signature(cli.serve_command).parameters["max_upload_mb"].default == DEFAULT_MAX_UPLOAD_MB


def test_predict_command_takes_a_study_folder_a_zip_and_a_nifti_slice(tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """`predict` said PNG/JPEG only and could not pick a NIfTI slice; a PACS folder is one study, as in the service."""
    import gzip
    import nibabel as nib

    series = phantom_series(tiny_run, tmp_path / "pacs" / "SERIES2", 5)
    scout = write_ct_series(tmp_path / "pacs" / "SCOUT", np.full((1, 48, 48), 24, np.uint16), image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in series + scout:
            z.write(p, str(p.relative_to(tmp_path)))

    def run(*args: str) -> str:
        out = run_cli("predict", *args)
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    volume = np.full((48, 48, 3), -1000, np.int16)
    nifti = tmp_path / "v.nii.gz"
    nifti.write_bytes(gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes()))
    for model, study, extra in ((tiny_run, tmp_path / "pacs", []), (tiny_bundle, archive, [str(nifti)])):
        text = " ".join(run(str(model), str(study), *extra).split())
        assert "5 slices, ordered by position" in text and "skipped" in text and "scout / localizer image" in text
        order = [line.split("SERIES2/")[1].split(":")[0] for line in text.split(str(study) + "/")[1:] if "SERIES2/" in line]
        assert order == [p.name for p in series]  # body order, whatever the names
        assert "study:" in text and "not a diagnosis" in text and FAKE_PATIENT_ID not in text
        assert all(f"[slice {i}]" in text for i in range(3)) == bool(extra)  # every slice of the volume
    one = run(str(tiny_bundle), str(nifti), "--slice", "2")
    assert "[slice 2]" in one and "[slice 0]" not in one


def test_study_view_windows_hu_itself_and_keeps_gray_only_for_inputs_without_hu() -> None:
    from covidscan.serve.study_view import StudyView

    hu = np.array([[[-1350, -600, 150, 1000]]], np.int16)
    view = StudyView(hu=hu, gray=None, heat=np.zeros((1, 1, 4), np.uint8), sources=["a"])
    assert view.gray_slice(0).tolist() == [[0, 128, 255, 255]]  # the lung window, the model's own
    assert view.gray_slice(0, "mediastinum").tolist() == [[0, 0, 198, 255]] and view.windows == ["lung", "mediastinum", "bone"]
    gray = np.array([[[7, 9]]], np.uint8)
    plain = StudyView(hu=None, gray=gray, heat=np.zeros((1, 1, 2), np.uint8), sources=["a"])
    assert plain.windows == ["as sent"] and np.array_equal(plain.gray_slice(0, "mediastinum"), gray[0])


def test_study_views_are_bounded_by_bytes_oldest_first() -> None:
    """The viewer keeps studies until together they would pass the byte bound; then the oldest goes (before: a count
    of 4, whatever their size). The newest is always kept."""
    from covidscan.serve.study_view import StudyView, StudyViews

    def view(slices: int) -> StudyView:
        return StudyView(hu=np.zeros((slices, 16, 16), np.int16), gray=None, heat=np.zeros((slices, 16, 16), np.uint8), sources=[""] * slices)

    one = view(10).nbytes  # 10 slices x 16 x 16 x (2 + 1) bytes
    views = StudyViews(max_bytes=3 * one)
    keys = [views.add(view(10)) for _ in range(4)]
    assert views.get(keys[0]) is None and all(views.get(k) is not None for k in keys[1:])
    big = views.add(view(40))  # larger than the whole bound: kept alone
    assert views.get(big) is not None and all(views.get(k) is None for k in keys)
