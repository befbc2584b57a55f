"""End to end on a tiny phantom: the same code path as `make demo`, smaller."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from covidscan.config import load_config
from covidscan.data.sources import index_folder
from covidscan.pipeline import train_run
from covidscan.predict import Predictor

TINY = ["data.image_size=48", "train.epochs=2", "train.head_epochs=1", "train.batch_size=16", "split.test_size=0.25", "split.val_size=0.25"]


@pytest.fixture(scope="module")
def tiny_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train_run(index_folder(tiny_phantom), load_config(None, TINY), run, show_progress=False, log=lambda m: None)
    return run


def test_run_folder_has_everything(tiny_run: Path) -> None:
    for name in ("config.yaml", "manifest.csv", "model.json", "metrics.json", "report.html", "history.jsonl", "history.csv",
                 "test_predictions.csv", "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["tp"] + test["fn"] + test["tn"] + test["fp"] == test["n"] == metrics["split"]["counts"]["test"]
    assert 0.0 <= test["auc"] <= 1.0
    assert "not a diagnosis" in metrics["decision_support"]
    page = (tiny_run / "report.html").read_text()
    assert "Confusion matrix" in page and "not a diagnosis" in page


def test_same_seed_same_metrics(tiny_phantom: Path, tiny_run: Path, tmp_path: Path) -> None:
    again = train_run(index_folder(tiny_phantom), load_config(None, TINY), tmp_path, show_progress=False, log=lambda m: None)
    first = json.loads((tiny_run / "metrics.json").read_text())
    assert json.dumps(again["test"]) == json.dumps(first["test"])  # NaN-safe equality
    assert (tmp_path / "manifest.csv").read_text() == (tiny_run / "manifest.csv").read_text()


def test_predictor_matches_saved_test_predictions(tiny_run: Path) -> None:
    import pandas as pd

    saved = pd.read_csv(tiny_run / "test_predictions.csv")
    predictor = Predictor(tiny_run)
    probs = predictor.probabilities(saved["path"].tolist()[:5])
    assert probs[:, 1] == pytest.approx(saved["p_COVID"].to_numpy()[:5], abs=1e-5)


def test_predict_cli_prints_probabilities_and_disclaimer(tiny_run: Path, tiny_phantom: Path) -> None:
    image = sorted(tiny_phantom.rglob("*.png"))[0]
    out = subprocess.run(
        [sys.executable, "-m", "covidscan.cli", "predict", str(tiny_run), str(image)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "P(COVID)=" in out and "P(non-COVID)=" in out and "not a diagnosis" in out


def test_cross_validation_runs_every_fold_and_aggregates(tiny_phantom: Path, tmp_path: Path) -> None:
    from covidscan.pipeline import cross_validate

    config = load_config(None, ["data.image_size=48", "train.epochs=1", "train.head_epochs=1", "train.batch_size=16"])
    summary = cross_validate(index_folder(tiny_phantom), config, tmp_path, folds=3, show_progress=False, log=lambda m: None)
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    aucs = [fold["auc"] for fold in summary["per_fold"]]
    assert summary["auc"]["mean"] == pytest.approx(sum(aucs) / 3)
    assert sum(fold["n"] for fold in summary["per_fold"]) == 48  # every image tested exactly once
    assert json.loads((tmp_path / "cv.json").read_text())["folds"] == 3
