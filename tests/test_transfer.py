"""Issue 14's tools: epoch selection, source-imitating augmentation, source balancing, local fine-tuning."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidscan.errors import ConfigError, DataError


# --- epoch selection ---------------------------------------------------------------------------------------------
def _history(losses: list[float], aucs: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "val_loss": loss, "val_auc": auc} for i, (loss, auc) in enumerate(zip(losses, aucs))]


def _kept(selection: str, history: list[dict[str, float]]) -> int:
    from covidscan.train.engine import _improves

    state: dict[str, object] = {"best_loss": math.inf, "best_auc": -math.inf, "best_epoch": -1}
    for row in history:
        if _improves(row, state, selection):
            state.update(best_loss=row["val_loss"], best_auc=row["val_auc"], best_epoch=row["epoch"])
    return int(state["best_epoch"])  # type: ignore[call-overload]


def test_selection_on_auc_keeps_the_epoch_that_ranks_best_where_loss_keeps_the_head_only_epoch() -> None:
    from covidscan.train.engine import selection_report, selection_rule

    # issue 14's UCSD run: validation loss rose (0.696 -> 0.748) while validation AUC climbed (0.607 -> 0.730)
    history = _history([0.696, 0.71, 0.73, 0.748, 0.74], [0.607, 0.65, 0.70, 0.730, 0.730])
    assert _kept("loss", history) == 1
    assert _kept("auc", history) == 5  # epoch 5 ties epoch 4 on AUC and has the lower loss (0.74 < 0.748)
    assert _kept("last", history) == 5
    report = selection_report(history, "loss", 1)
    assert report["best_auc_epoch"] == 5 and "loss and AUC disagree" in str(report["warning"])
    assert "warning" not in selection_report(history, "auc", 5) and "warning" not in selection_report(history, "last", 5)
    assert selection_rule("auc", num_classes=3) == "loss" and selection_rule("auc", num_classes=2) == "auc"


def test_fit_keeps_the_epoch_its_selection_names_while_drawing_by_source_with_source_augmentation(tiny_phantom: Path, tmp_path: Path) -> None:
    """The training loop's wiring: train.select reaches the kept epoch; draw weights and source_augment run through it."""
    from covidscan.config import TrainConfig
    from covidscan.data.io import load_image_array
    from covidscan.data.manifest import image_refs
    from covidscan.data.sources import index_folder
    from covidscan.data.transforms import Normaliser
    from covidscan.models.classifier import CovidClassifier
    from covidscan.seed import seed_everything
    from covidscan.train.engine import TensorData, fit, source_weights

    frame = index_folder(tiny_phantom)
    images = torch.from_numpy(load_image_array(image_refs(frame), 48, show=False))
    labels = torch.from_numpy((frame["label"] == "COVID").to_numpy().astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(frame)))
    images, labels = images[order], labels[order]
    weights = source_weights(np.array(["a"] * 24 + ["b"] * 8))
    train, val = TensorData(images[:32], labels[:32], weights), TensorData(images[32:], labels[32:])
    for select in ("auc", "loss"):
        seed_everything(0)
        model = CovidClassifier("efficientnet_lite0", 2, 1, 0.25, "imagenet")
        cfg = TrainConfig(epochs=4, batch_size=8, patience=10, seed=0, select=select, source_augment=0.5)
        result = fit(model, train, val, cfg, "shallow", Normaliser(0.5, 0.5), tmp_path / select, log=lambda m: None)
        history = result["history"]
        best = (max(history, key=lambda r: (r["val_auc"], -r["val_loss"])) if select == "auc" else min(history, key=lambda r: r["val_loss"]))
        assert result["best_epoch"] == best["epoch"] and result["selection"]["kept_epoch"] == best["epoch"]
        assert result["selection"]["on"] == ("AUC" if select == "auc" else "loss")


def test_auc_ties_are_broken_by_the_lower_loss() -> None:
    history = _history([0.60, 0.50, 0.55], [0.80, 0.80, 0.79])
    assert _kept("auc", history) == 2


def test_config_refuses_an_unknown_selection_and_an_augmentation_probability_above_one() -> None:
    from covidscan.config import load_config

    with pytest.raises(ConfigError, match="train.select must be one of loss, auc, last"):
        load_config(None, ["train.select=accuracy"])
    with pytest.raises(ConfigError, match="train.source_augment is a probability"):
        load_config(None, ["train.source_augment=1.5"])


# --- source-imitating augmentation -------------------------------------------------------------------------------
def _lungs(n: int = 6, size: int = 64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body = ((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1).float() * 0.6
    lungs = (((x.abs() - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1).float() * 0.5
    return (body - lungs + 0.1).clamp(0, 1).expand(n, 1, size, size).clone()


def test_source_augmentation_is_reproducible_bounded_and_off_at_zero() -> None:
    from covidscan.data.source_augment import imitate_sources

    x = _lungs()
    assert imitate_sources(x, torch.Generator().manual_seed(0), 0.0) is x
    a = imitate_sources(x, torch.Generator().manual_seed(3), 0.7)
    b = imitate_sources(x, torch.Generator().manual_seed(3), 0.7)
    assert torch.equal(a, b) and a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    changed = (a - x).abs().flatten(1).amax(1)
    assert (changed > 0.05).sum() >= 4  # at p = 0.7 nearly every image went through several steps
    assert not torch.equal(a, imitate_sources(x, torch.Generator().manual_seed(4), 0.7))


def test_each_source_step_does_what_its_name_says() -> None:
    from covidscan.data import source_augment as s

    x, generator, every = _lungs(4), torch.Generator().manual_seed(0), torch.ones(4, dtype=torch.bool)
    framed = s._framing(x, every, generator)
    border = torch.cat([framed[:, :, 0], framed[:, :, -1], framed[:, :, :, 0], framed[:, :, :, -1]], -1).flatten(1)
    assert (border.std(1) < 0.05).sum() >= 1  # a zoomed-out image sits on a uniform figure border
    marked = s._marks(torch.full((1, 64, 64), 0.5), generator)
    assert ((marked == 1.0) | (marked == 0.0)).sum() > 10  # arrows and letters are drawn in white or black
    assert 0 < (marked != 0.5).float().mean() < 0.2  # ... and cover only a small part of the image
    smooth = s._resolution(x[0], generator)
    assert smooth.shape == x[0].shape and (smooth - x[0]).abs().max() > 0.05
    jpeg = s._jpeg(x[0], generator)
    assert jpeg.shape == x[0].shape and 0 < (jpeg - x[0]).abs().mean() < 0.1
    window = s._window(x, every, generator)
    assert not torch.allclose(window, x) and float(window.max()) <= 1


# --- source balancing --------------------------------------------------------------------------------------------
def test_source_weights_give_every_source_the_same_share_of_an_epoch() -> None:
    from covidscan.train.engine import source_weights

    sources = np.array(["big"] * 90 + ["small"] * 10)
    weights = source_weights(sources)
    assert weights[:90].sum().item() == pytest.approx(0.5) and weights[90:].sum().item() == pytest.approx(0.5)
    draws = torch.multinomial(weights, 10_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert 0.47 < float((draws >= 90).float().mean()) < 0.53


# --- local fine-tuning -------------------------------------------------------------------------------------------
def _hospital_b(root: Path, seed: int = 3) -> pd.DataFrame:
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset
    from covidscan.data.sources import index_folder

    return index_folder(generate_phantom_dataset(root, PhantomSpec(patients_per_class=6, slices_per_patient=3, image_size=48, seed=seed, scanner="B")))


def test_sample_patients_draws_whole_patients_half_positive_reproducibly(tmp_path: Path) -> None:
    from covidscan.finetune import patient_keys, sample_patients

    frame = _hospital_b(tmp_path)
    first = sample_patients(frame, 5, draw=0, positive="COVID", where="b.csv")
    assert len(set(patient_keys(first))) == 5 and len(first) == 5 * 3  # every slice of each chosen patient
    per_patient = first.groupby("patient_id")["label"].first()
    assert (per_patient == "COVID").sum() == 3 and (per_patient != "COVID").sum() == 2
    assert first.equals(sample_patients(frame, 5, draw=0, positive="COVID", where="b.csv"))
    assert set(sample_patients(frame, 5, draw=1, positive="COVID", where="b.csv")["patient_id"]) != set(first["patient_id"])
    with pytest.raises(DataError, match="b.csv.*only 6 positive patients"):
        sample_patients(frame, 14, draw=0, positive="COVID", where="b.csv")


def test_finetune_starts_from_the_run_replays_its_images_and_records_what_it_did(tiny_run: Path, tmp_path: Path) -> None:
    from covidscan.finetune import finetune_run
    from covidscan.predict import Predictor

    local = _hospital_b(tmp_path / "b")
    held_out = _hospital_b(tmp_path / "b2", seed=4)
    # A vanishing learning rate: the weights must stay those of the source run (proves the start), BN statistics aside.
    finetune_run(tiny_run, local, tmp_path / "still", "hospital-b", patients=4, draw=0, show=False, log=lambda m: None,
                 overrides=["train.lr=1e-12", "train.epochs=2", "train.mixup=0.2", "train.schedule=cosine"],
                 externals={"hospital-b-held-out": held_out})
    source, tuned = Predictor(tiny_run), Predictor(tmp_path / "still")
    weights = [(a, b) for (name, a), b in zip(source.model.named_parameters(), tuned.model.parameters())]
    assert weights and all(torch.allclose(a, b, atol=1e-6) for a, b in weights)
    card = json.loads((tmp_path / "still" / "model.json").read_text())
    record = card["local_finetune"]
    assert record["patients"] == 4 and record["images"] == 12 and record["source_run"] == tiny_run.name
    assert card["pretrained_from"].startswith(f"run {tiny_run.name}")
    metrics = json.loads((tmp_path / "still" / "metrics.json").read_text())
    assert metrics["training"]["best_epoch"] == 2 and metrics["training"]["selection"]["on"].startswith("(none")  # fixed schedule: last epoch
    assert set(metrics["evaluation"]["sets"]) == {"in-domain test", "hospital-b-held-out"}
    manifest = pd.read_csv(tmp_path / "still" / "manifest.csv", keep_default_na=False)
    train = manifest[manifest["split"] == "train"]
    assert (train["source"] == "local:hospital-b").sum() == 12 and (train["source"] != "local:hospital-b").sum() > 0  # replayed source images
    source_manifest = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    assert sorted(manifest.loc[manifest["split"] == "test", "path"]) == sorted(source_manifest.loc[source_manifest["split"] == "test", "path"])
    report = (tmp_path / "still" / "report.html").read_text()
    assert 'id="methods"' in report and "4 patients (12 images) of hospital-b" in report
    assert "mixup α = 0.2; label smoothing off; learning rate cosine" in report  # every training option used is stated


def test_finetune_refuses_a_mismatched_start_and_one_class_data(tiny_run: Path, tmp_path: Path) -> None:
    from covidscan.config import load_config
    from covidscan.data.manifest import load_manifest
    from covidscan.finetune import finetune_run
    from covidscan.pipeline import train_run

    local = _hospital_b(tmp_path / "b")
    with pytest.raises(DataError, match="one class only"):
        finetune_run(tiny_run, local[local["label"] == "COVID"], tmp_path / "one", "hospital-b", show=False, log=lambda m: None)
    config = load_config(tiny_run / "config.yaml", ["data.image_size=64", f"model.init_from={tiny_run}"])
    with pytest.raises(ConfigError, match=r"cannot start this run: image size 48 \(this run: 64\)"):
        train_run(load_manifest(tiny_run / "manifest.csv"), config, tmp_path / "mismatch", show_progress=False, log=lambda m: None)
    shutil.rmtree(tmp_path / "mismatch", ignore_errors=True)
