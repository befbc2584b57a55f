"""Bad input gets one line naming the path and the problem, exit code 2, no traceback."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import CliResult, run_cli


def _run(*args: str) -> CliResult:
    return run_cli(*args)


def _assert_clean_error(result: CliResult, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in message, message


def test_help_for_every_command() -> None:
    for args in ([], ["data"], ["data", "index"], ["data", "phantom"], ["split"], ["train"], ["predict"], ["models"], ["dicom-listen"], ["demo"], ["evaluate"], ["export"], ["serve"], ["cv"]):
        result = _run(*args, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, args


def test_missing_folder(tmp_path: Path) -> None:
    _assert_clean_error(_run("data", "index", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m.csv")), "nowhere", "does not exist")


def test_empty_folder(tmp_path: Path) -> None:
    _assert_clean_error(_run("data", "index", str(tmp_path), "-o", str(tmp_path / "m.csv")), str(tmp_path), "no images")


def test_one_class_only(tmp_path: Path) -> None:
    (tmp_path / "COVID").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "COVID" / "a.png")
    _assert_clean_error(_run("data", "index", str(tmp_path), "-o", str(tmp_path / "m.csv")), "only one class")


def test_unreadable_image_stops_training_with_its_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for cls in ("COVID", "non-COVID"):
        for p in range(3):
            folder = data / cls / f"{cls}-{p}"
            folder.mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "s.png")
    bad = data / "COVID" / "COVID-1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    manifest = tmp_path / "m.csv"
    assert _run("data", "index", str(data), "-o", str(manifest)).returncode == 0
    result = _run("train", str(manifest), "--out", str(tmp_path / "run"), "--quiet",
                  "--set", "data.image_size=32", "--set", "train.epochs=1", "--set", "split.test_size=0.34", "--set", "split.val_size=0.33")
    _assert_clean_error(result, "broken.png", "corrupt or truncated")


def test_train_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    (tmp_path / "m.csv").write_text("path,label\na.png,COVID\n")
    _assert_clean_error(_run("train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")), "run folder exists")


@pytest.mark.parametrize("content", ["", "just,some\ncsv,text\n"])
def test_bad_manifest(tmp_path: Path, content: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    _assert_clean_error(_run("split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o.csv")), "m.csv")


def test_audit_command_writes_reports_and_drops_on_request(tmp_path: Path) -> None:
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset

    data = generate_phantom_dataset(tmp_path / "data", PhantomSpec(patients_per_class=3, slices_per_patient=2, image_size=48))
    (data / "COVID" / "cov-patient-000" / "slice-00.png").write_bytes(b"not a png")
    assert _run("data", "index", str(data), "-o", str(tmp_path / "m.csv")).returncode == 0
    result = _run("audit", str(tmp_path / "m.csv"), "-o", str(tmp_path / "audit"), "--drop", "corrupt", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "dropped 1 images" in result.stdout
    for name in ("audit.json", "audit.html", "manifest.audited.csv", "clean_manifest.csv"):
        assert (tmp_path / "audit" / name).is_file()
    assert len((tmp_path / "audit" / "clean_manifest.csv").read_text().splitlines()) == 1 + 12 - 1
    _assert_clean_error(_run("audit", str(tmp_path / "m.csv"), "-o", str(tmp_path / "a2"), "--drop", "kittens", "--quiet"), "kittens")


def test_split_command_reports_leakage_for_patient_and_random(tmp_path: Path) -> None:
    import json

    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset

    data = generate_phantom_dataset(tmp_path / "data", PhantomSpec(patients_per_class=5, slices_per_patient=3, image_size=48))
    assert _run("data", "index", str(data), "-o", str(tmp_path / "m.csv")).returncode == 0
    result = _run("split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "s.csv"), "--quiet", "--test-size", "0.2", "--val-size", "0.2")
    assert result.returncode == 0, result.stderr
    assert "split by patient" in result.stdout and "leakage (test)" in result.stdout
    report = json.loads((tmp_path / "s.split.json").read_text())
    assert set(report["group_ids"]["test"]).isdisjoint(report["group_ids"]["train"])
    random = _run("split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "r.csv"), "--by", "random", "--quiet",
                  "--embeddings", str(tmp_path / "s.embeddings.npz"))
    assert random.returncode == 0 and "warning" in random.stdout and "demonstrate leakage" in random.stdout
    _assert_clean_error(_run("split", str(tmp_path / "m.csv"), "-o", str(tmp_path / "x.csv"), "--by", "sideways", "--quiet",
                             "--embeddings", str(tmp_path / "s.embeddings.npz")), "sideways")


def test_paths_with_brackets_survive_in_error_messages(tmp_path: Path) -> None:
    _assert_clean_error(_run("data", "index", str(tmp_path / "scan [2020]"), "-o", str(tmp_path / "m.csv")), "scan [2020]")
