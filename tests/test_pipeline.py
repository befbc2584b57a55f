"""End to end on a tiny phantom: the same code path as `make demo`, smaller."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidscan.config import load_config
from covidscan.data.sources import index_folder
from covidscan.pipeline import train_run
from covidscan.predict import Predictor

from cli_runner import run_cli
from conftest import TINY


def test_run_folder_has_everything(tiny_run: Path) -> None:
    for name in ("config.yaml", "manifest.csv", "model.json", "metrics.json", "report.html", "history.jsonl", "history.csv",
                 "test_predictions.csv", "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["tp"] + test["fn"] + test["tn"] + test["fp"] == test["n"] == metrics["split"]["counts"]["test"]
    assert 0.0 <= test["auc"] <= 1.0
    assert "not a diagnosis" in metrics["decision_support"]
    assert metrics["training"]["memory_format"] == "channels_last" and metrics["training"]["threads"] >= 1  # recorded in the run
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
    result = run_cli("predict", str(tiny_run), str(image))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "P(COVID)=" in out and "P(non-COVID)=" in out and "not a diagnosis" in out


def test_cross_validation_runs_every_fold_and_aggregates(tiny_phantom: Path, tmp_path: Path) -> None:
    from covidscan.pipeline import cross_validate

    config = load_config(None, ["data.image_size=48", "train.epochs=1", "train.head_epochs=1", "train.batch_size=16"])
    summary = cross_validate(index_folder(tiny_phantom), config, tmp_path, folds=3, show_progress=False, log=lambda m: None)
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    aucs = [fold["auc"] for fold in summary["per_fold"]]
    assert summary["auc"]["mean"] == pytest.approx(sum(aucs) / 3)
    assert sum(fold["n"] + fold["refused_by_gate"] for fold in summary["per_fold"]) == 48  # every image tested exactly once
    assert json.loads((tmp_path / "cv.json").read_text())["folds"] == 3


def _external_manifest(tmp_path: Path, seed: int = 5) -> Path:
    from covidscan.data.manifest import save_manifest
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset

    root = generate_phantom_dataset(tmp_path / "other-hospital", PhantomSpec(patients_per_class=3, slices_per_patient=2, image_size=48, seed=seed))
    return save_manifest(index_folder(root, source="other-hospital"), tmp_path / "other-hospital.csv")


def test_evaluate_cli_adds_an_external_set_and_the_report_shows_it_in_a_browser(tiny_run: Path, tmp_path: Path) -> None:
    import re
    import shutil

    import pandas as pd

    from browser import dump_dom

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    external = _external_manifest(tmp_path)
    out = run_cli("evaluate", str(run), str(external), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "other-hospital: " in out.stdout and "refused by the gate" in out.stdout and "not a diagnosis" in out.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    sets = metrics["evaluation"]["sets"]
    assert [sets[k]["kind"] for k in sets] == ["in-domain", "external"]
    ext = sets["other-hospital"]
    assert ext["n"] + ext["gate"]["refused"] == 12 and ext["all_images"]["n"] == 12
    assert ext["all_images"]["patient_level"]["patients"] == 6 and ext["all_images"]["ci_unit"] == "6 patients"
    assert json.dumps(sets["in-domain test"]["metrics"]) == json.dumps(json.loads((tiny_run / "metrics.json").read_text())["test"])
    card = json.loads((run / "model.json").read_text())
    assert metrics["evaluation"]["calibration"] == card["calibration"] and "validation" in card["calibration"]["fitted_on"]
    for item in ext["explain"]["gallery"]:
        assert (run / item["file"]).is_file()
    tsne = pd.read_csv(run / "tsne.csv")
    assert set(tsne["set"]) == {"training part", "in-domain test", "other-hospital"} and "patient_id" not in tsne.columns

    page = (run / "report.html").read_text()
    for name, result in sets.items():  # every summary figure is the metrics.json value
        row = re.search(rf"<td>{re.escape(name)}</td>.*?</tr>", page, re.S)
        assert row is not None
        assert f"{result['metrics']['auc']:.3f}" in row.group(0) or math.isnan(result["metrics"]["auc"])
    dom = dump_dom((run / "report.html").as_uri(), tmp_path / "profile")
    for section in ("intended-use", "summary", "provenance", "split", "details", "tsne", "training", "model-card"):
        assert f'id="{section}"' in dom, section
    assert "not a diagnosis" in dom and dom.count("data:image/png;base64,") == len(sets["in-domain test"]["explain"]["gallery"]) + len(ext["explain"]["gallery"])
    assert "patient-" not in dom  # no patient IDs on the page


def test_evaluate_refuses_labels_the_model_does_not_know(tiny_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pneumonia.csv"
    frame = index_folder(_external_manifest(tmp_path).parent / "other-hospital")
    frame["label"] = "pneumonia"
    frame.to_csv(bad, index=False)
    out = run_cli("evaluate", str(tiny_run), str(bad))
    assert out.returncode == 2 and "pneumonia" in out.stderr and "not among the model's classes" in out.stderr
    assert "Traceback" not in out.stderr


def test_compare_two_runs_and_test_time_augmentation(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    import pandas as pd

    same = run_cli("compare", str(tiny_run), str(tiny_run))
    assert same.returncode == 0, same.stderr
    assert "only A right 0, only B right 0, p = 1" in same.stdout and "difference +0.000" in same.stdout and "patients as units" in same.stdout
    run = tmp_path / "tta"
    shutil.copytree(tiny_run, run)
    out = run_cli("evaluate", str(run), "--set", "evaluate.tta=true", "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "metrics.json").read_text())["evaluation"]["tta"] is True
    plain = pd.read_csv(tiny_run / "predictions" / "in-domain-test.csv")["p_COVID"].to_numpy()
    mirrored = pd.read_csv(run / "predictions" / "in-domain-test.csv")["p_COVID"].to_numpy()
    assert len(plain) == len(mirrored) and not np.allclose(plain, mirrored)
    missing = run_cli("compare", str(tiny_run), str(run), "--on", "nowhere")
    assert missing.returncode == 2 and "in-domain-test" in missing.stderr


def test_three_classes_train_evaluate_and_report(tiny_phantom: Path, tmp_path: Path) -> None:
    """COVID / pneumonia / normal (as with the X-ray sets): per-class one-vs-rest metrics, macro and weighted."""
    frame = index_folder(tiny_phantom)
    healthy = frame["label"] == "non-COVID"
    odd = frame["patient_id"].str[-1].isin(list("13579"))
    frame.loc[healthy & odd, "label"] = "pneumonia"
    frame.loc[healthy & ~odd, "label"] = "normal"
    config = load_config(None, TINY + ["data.labels=auto", "split.test_size=0.3", "split.val_size=0.3"])
    metrics = train_run(frame, config, tmp_path / "run", show_progress=False, log=lambda m: None)
    result = metrics["evaluation"]["sets"]["in-domain test"]["metrics"]
    assert set(result["per_class"]) == {"COVID", "normal", "pneumonia"}
    gate = metrics["evaluation"]["sets"]["in-domain test"]["gate"]
    assert 0.0 <= result["macro_f1"] <= 1.0 and result["n"] + gate["refused"] == metrics["split"]["counts"]["test"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "macro F1" in page and "pneumonia" in page and "AUC [95 % CI]" in page
    # each class's one-vs-rest AUC has its patient-clustered interval, and every class's probability is kept per image
    for name, row in result["per_class"].items():
        ci = row["auc_ci"]
        assert ci["low"] <= row["auc"] <= ci["high"] and ci["high"] - ci["low"] > 0, name
    predictions = pd.read_csv(tmp_path / "run" / "test_predictions.csv")
    assert [c for c in predictions.columns if c.startswith("p_")] == ["p_COVID", "p_normal", "p_pneumonia"]
    assert np.allclose(predictions[["p_COVID", "p_normal", "p_pneumonia"]].sum(axis=1), 1.0, atol=1e-5)


def test_channels_last_default_keeps_the_split_and_the_metrics_within_noise(tiny_phantom: Path, tiny_run: Path, tmp_path: Path) -> None:
    """The faster layout changes summation order only: same manifest and split, metrics within noise."""
    nchw = train_run(index_folder(tiny_phantom), load_config(None, TINY + ["train.channels_last=false"]), tmp_path,
                     show_progress=False, log=lambda m: None)
    assert (tmp_path / "manifest.csv").read_text() == (tiny_run / "manifest.csv").read_text()
    first = json.loads((tiny_run / "metrics.json").read_text())
    assert first["training"]["memory_format"] == "channels_last" and nchw["training"]["memory_format"] == "contiguous"
    a = json.loads((tiny_run / "metrics.json").read_text())["evaluation"]["sets"]["in-domain test"]["all_images"]["metrics"]
    b = nchw["evaluation"]["sets"]["in-domain test"]["all_images"]["metrics"]
    assert abs(a["auc"] - b["auc"]) <= 0.1 and abs(a["accuracy"] - b["accuracy"]) <= 0.15
    # the first epoch's training loss agrees to 1e-3: the layouts compute the same function
    loss_a = json.loads((tiny_run / "history.jsonl").read_text().splitlines()[0])["train_loss"]
    loss_b = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])["train_loss"]
    assert loss_a == pytest.approx(loss_b, rel=1e-3)
    assert first["training"]["training_precision"] == "fp32"


def test_cpu_bf16_training_is_opt_in_and_recorded(tiny_phantom: Path, tmp_path: Path) -> None:
    config = load_config(None, TINY + ["train.cpu_bf16=true", "train.epochs=1"])
    metrics = train_run(index_folder(tiny_phantom), config, tmp_path, show_progress=False, log=lambda m: None)
    assert metrics["training"]["training_precision"] == "bf16 autocast"
    assert math.isfinite(json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])["train_loss"])
