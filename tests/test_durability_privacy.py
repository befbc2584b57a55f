"""Bundle swaps that survive a kill, patient keys that cannot be brute-forced, no telemetry, offline API docs."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from covidscan import atomic


def test_swap_folder_keeps_a_complete_folder_at_every_step(tmp_path: Path) -> None:
    target, new = tmp_path / "bundle", tmp_path / ".bundle.staging"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "model.json").write_text(text)
    atomic.swap_folder(new, target)
    assert (target / "model.json").read_text() == "new" and not new.exists() and not (tmp_path / ".bundle.old").exists()
    # Killed between "old aside" and "new in": the old bundle comes back, and a later swap still works.
    new.mkdir()
    (new / "model.json").write_text("newer")
    os.replace(target, tmp_path / ".bundle.old")
    assert atomic.recover_folder(target) and (target / "model.json").read_text() == "new"
    os.replace(target, tmp_path / ".bundle.old")
    atomic.swap_folder(new, target)
    assert (target / "model.json").read_text() == "newer" and not (tmp_path / ".bundle.old").exists()


def test_a_bundle_killed_mid_swap_still_serves(tiny_bundle: Path, tmp_path: Path) -> None:
    from covidscan.serve.predictor import Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, tmp_path / ".bundle.old")  # as left by a kill between the two renames
    assert Bundle(bundle).classes == ["non-COVID", "COVID"] and (bundle / "model.onnx").is_file()


def test_patient_keys_use_a_per_installation_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from covidscan.data import pseudonym

    monkeypatch.setenv("COVIDSCAN_SECRET_FILE", str(tmp_path / "a" / "secret"))
    key_a = pseudonym.patient_key("12345678")
    secret = tmp_path / "a" / "secret"
    assert secret.is_file() and (secret.stat().st_mode & 0o777) == 0o600 and len(secret.read_bytes()) == 32
    assert pseudonym.patient_key("12345678") == key_a and pseudonym.patient_key("12345679") != key_a
    old_fixed_salt = "pk-" + hashlib.sha256(b"covidscan-patient-key-v1" + b"12345678").hexdigest()[:16]
    assert key_a != old_fixed_salt and "12345678" not in key_a
    monkeypatch.setenv("COVIDSCAN_SECRET_FILE", str(tmp_path / "b" / "secret"))
    assert pseudonym.patient_key("12345678") != key_a  # another installation, another key


def test_onnx_runtime_writes_no_telemetry_under_home(tiny_bundle: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    code = f"from covidscan.serve.predictor import Bundle\nimport numpy as np\nBundle({str(tiny_bundle)!r}).analyse([np.zeros((48, 48), np.float32)])\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    assert not (tmp_path / ".cache" / "Microsoft").exists(), list(tmp_path.rglob("*"))


def test_api_docs_load_without_a_cdn(tiny_bundle: Path) -> None:
    from covidscan.serve.app import create_app

    client = TestClient(create_app(tiny_bundle))
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.replace("https://fastapi.tiangolo.com", "")
    script = client.get("/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/docs-assets/..%2F..%2Fcore.py").status_code == 404
