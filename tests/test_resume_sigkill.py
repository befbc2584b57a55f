"""`kill -9` during training, then `covidscan train --resume RUN`: same final metrics as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from covidscan.data.manifest import save_manifest
from covidscan.data.sources import index_folder
from covidscan.data.split import split_by_patient

SETTINGS = ["--set", "data.image_size=48", "--set", "train.epochs=4", "--set", "train.head_epochs=1",
            "--set", "train.batch_size=8", "--set", "train.patience=10", "--quiet",
            "--quick"]  # the quick evaluation (every metric with its interval; no heat maps or t-SNE): resuming is the point


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "covidscan.cli", "train", *args, *SETTINGS]


def test_resume_after_sigkill_gives_the_same_metrics(tiny_phantom: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    save_manifest(split_by_patient(index_folder(tiny_phantom), 0.25, 0.25, seed=0), manifest)

    subprocess.run(_train(str(manifest), "--out", str(tmp_path / "whole")), check=True, capture_output=True)
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())["test"]

    run = tmp_path / "killed"
    process = subprocess.Popen(_train(str(manifest), "--out", str(run)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = run / "history.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "metrics.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "covidscan.cli", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    got = json.loads((run / "metrics.json").read_text())["test"]
    assert json.dumps(got) == json.dumps(expected)
    assert len((run / "history.jsonl").read_text().splitlines()) == 4
