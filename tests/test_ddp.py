"""The same train command under torchrun uses DDP (gloo on CPU); both ranks end with identical weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from covidscan.data.manifest import save_manifest
from covidscan.data.sources import index_folder
from covidscan.data.split import split_by_patient


def test_two_process_ddp_training_ranks_agree(tiny_phantom: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    save_manifest(split_by_patient(index_folder(tiny_phantom), 0.25, 0.25, seed=0), manifest)
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "covidscan.cli", "train", str(manifest), "--out", str(run), "--quiet",
        "--set", "data.image_size=48", "--set", "train.epochs=2", "--set", "train.head_epochs=1", "--set", "train.batch_size=8",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    training = json.loads((run / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["ranks_agree"] is True
    assert sum(line.startswith("in-domain test: ") for line in result.stdout.splitlines()) == 1  # only rank 0 reports
    assert len((run / "history.jsonl").read_text().splitlines()) == 2
