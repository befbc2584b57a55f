"""Evaluation building blocks: multi-class metrics, ties, aggregation, curves, calibration, gallery, CAMs, lung mask."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covidscan.config import EvaluateConfig
from covidscan.evaluate.aggregate import aggregate_by_patient
from covidscan.evaluate.curves import pr_points, reliability_bins, roc_points
from covidscan.decision import apply_temperature
from covidscan.evaluate.evaluation import fit_decision, gallery_picks
from covidscan.evaluate.metrics import binary_metrics, multiclass_metrics
from covidscan.explain.lung_mask import energy_inside, lung_mask
from covidscan.explain.overlay import colorize, overlay


def test_tied_scores_agree_with_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        p = np.round(np.clip(y * 0.3 + rng.random(60) * 0.7, 0, 1), 1)  # many ties
        m = binary_metrics(y, p)
        assert m["auc"] == pytest.approx(roc_auc_score(y, p))
        assert m["auc_pr"] == pytest.approx(average_precision_score(y, p))


def test_multiclass_macro_and_weighted_agree_with_scikit_learn() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    probs = rng.random((150, 3)) + np.eye(3)[y] * 0.8
    probs /= probs.sum(1, keepdims=True)
    m = multiclass_metrics(y, probs, ["COVID", "normal", "pneumonia"])
    pred = probs.argmax(1)
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average=average)
        assert m[f"{average}_precision"] == pytest.approx(precision)
        assert m[f"{average}_sensitivity"] == pytest.approx(recall)
        assert m[f"{average}_f1"] == pytest.approx(f1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert set(m["per_class"]) == {"COVID", "normal", "pneumonia"}


def test_patient_aggregation_hand_worked() -> None:
    ids = np.array(["a", "a", "a", "b", "b"])
    y = np.array([1, 1, 1, 0, 0])
    score = np.array([0.9, 0.1, 0.5, 0.2, 0.4])
    mean = aggregate_by_patient(ids, y, score, "mean").set_index("patient_id")
    assert mean.loc["a", "score"] == pytest.approx(0.5) and mean.loc["b", "score"] == pytest.approx(0.3)
    assert aggregate_by_patient(ids, y, score, "max").set_index("patient_id").loc["a", "score"] == pytest.approx(0.9)
    top2 = aggregate_by_patient(ids, y, score, "topk", k=2).set_index("patient_id")
    assert top2.loc["a", "score"] == pytest.approx(0.7) and top2.loc["a", "slices"] == 3 and top2.loc["b", "label"] == 0


def test_curves_and_reliability_bins() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.35, 0.8, 0.65, 0.3, 0.72])
    roc = roc_points(y, p)
    assert roc[0] == [0.0, 0.0] and roc[-1] == [1.0, 1.0]
    assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in zip(roc, roc[1:]))
    pr = pr_points(y, p)
    assert pr[0][0] == 0.0 and pr[-1][0] == 1.0
    bins = reliability_bins(y, p)
    assert sum(b["count"] for b in bins) == 6
    high = [b for b in bins if b["low"] == pytest.approx(0.6)][0]
    assert high["count"] == 1 and high["observed"] == 1.0 and high["mean_predicted"] == pytest.approx(0.65)
    assert roc_points(np.zeros(3), np.array([0.1, 0.2, 0.3])) == []


def test_temperature_keeps_the_default_decision_and_operating_points_come_from_validation() -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.15, 200), 0.01, 0.99)  # under-confident
    probs = np.stack([1 - p1, p1], 1)
    val = pd.DataFrame({"label": np.where(y == 1, "COVID", "non-COVID"), "patient_id": [f"p{i // 4}" for i in range(200)]})
    decision = fit_decision(val, probs, ["non-COVID", "COVID"], EvaluateConfig(target_sensitivity=0.9, target_specificity=0.9))
    calibration = decision["calibration"]
    assert calibration["kept"] and calibration["temperature"] < 1.0  # sharpens an under-confident model, checked on held-out patients
    assert calibration["held_out_log_loss"]["temperature"] < calibration["held_out_log_loss"]["uncalibrated"]
    scaled = apply_temperature(probs, calibration["temperature"])
    assert np.array_equal(scaled[:, 1] >= 0.5, p1 >= 0.5)
    points = calibration["operating_points"]
    high_sensitivity = [v for k, v in points.items() if k.startswith("high sensitivity")][0]
    assert (scaled[y == 1, 1] >= high_sensitivity).mean() >= 0.9
    assert points["default"] == 0.5
    assert decision["decision_settings"]["target_sensitivity"] == 0.9 and decision["study_rule"]["threshold"] > 0


def test_gallery_picks_the_most_confident_case_of_each_cell() -> None:
    y = np.array([True, True, False, False, True, False])
    score = np.array([0.9, 0.2, 0.6, 0.1, 0.7, 0.95])
    picks = gallery_picks(y, score, 0.5, per_cell=2)
    assert picks == {"TP": [0, 4], "FN": [1], "FP": [5, 2], "TN": [3]}


def _chest(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A bright body ellipse with two dark lungs on dark air; returns (image uint8, true lung mask)."""
    yy, xx = np.mgrid[:size, :size] / size
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 <= 1
    lungs = (((xx - 0.32) / 0.12) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1) | (((xx - 0.68) / 0.12) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1)
    image = np.where(body, 200, 10).astype(np.float32)
    image[lungs] = 30
    image += np.random.default_rng(0).normal(0, 4, image.shape)
    return image.clip(0, 255).astype(np.uint8), lungs


def test_lung_mask_finds_the_lungs_and_energy_share() -> None:
    image, truth = _chest()
    mask = lung_mask(image)
    assert mask is not None
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85
    assert lung_mask(np.full((64, 64), 120, np.uint8)) is None
    heat = truth.astype(float)
    assert energy_inside(heat, mask) > 0.9
    assert energy_inside(1 - heat, mask) < 0.1
    assert math.isnan(energy_inside(heat, None))


def test_overlay_colours_hot_regions_and_keeps_cold_ones_gray() -> None:
    assert tuple(colorize(np.array([[0.0]]))[0, 0]) == (0, 0, 130)
    assert tuple(colorize(np.array([[1.0]]))[0, 0]) == (180, 0, 0)
    gray = np.full((8, 8), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = overlay(gray, heat)
    assert out.shape == (8, 8, 3)
    assert tuple(out[7, 7]) == (100, 100, 100)  # no heat: the image unchanged
    assert out[0, 0, 0] > out[0, 0, 2]  # hot: red over blue


def test_gradcam_on_the_registered_layer_equals_the_class_activation_map() -> None:
    """For a GAP-linear head, Grad-CAM is ReLU(sum_c w_c F_c): what the ONNX export's feature map gives."""
    import cv2

    from covidscan.data.transforms import Normaliser, to_float
    from covidscan.explain.cam import heatmaps
    from covidscan.models.classifier import CovidClassifier
    from covidscan.models.registry import get_backbone

    torch.manual_seed(0)
    model = CovidClassifier("efficientnet_lite0", 2, weights="packaged").eval()
    normaliser = Normaliser.for_backbone(get_backbone("efficientnet_lite0"))
    images = _chest(96)[0][None, None].repeat(2, 0)
    images[1] = np.flipud(images[1, 0])[None]
    heat = heatmaps(model, images, normaliser, target_class=1)
    assert heat.shape == (2, 96, 96) and heat.min() >= 0 and heat.max() <= 1
    with torch.no_grad():
        features = model.forward_features(normaliser(to_float(torch.from_numpy(images))))
    manual = torch.relu(torch.einsum("c,nchw->nhw", model.head.weight[1].detach(), features)).numpy()
    for i in range(2):
        m = manual[i] - manual[i].min()
        m = m / (m.max() + 1e-7)
        expected = cv2.resize(m, (96, 96))
        assert np.corrcoef(heat[i].ravel(), expected.ravel())[0, 1] > 0.9999
        assert np.abs(heat[i] - expected).max() < 0.02  # float32 rounding inside grad-cam
