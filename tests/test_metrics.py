from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from covidscan.evaluate.metrics import binary_metrics


def test_hand_worked_example() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])  # tp=3 fn=1 fp=1 tn=3
    m = binary_metrics(y, p)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["precision"] == 0.75
    assert m["accuracy"] == 0.75 and m["f1"] == 0.75


def test_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))


def test_one_class_gives_nan_auc_with_warning_and_nan_ratios() -> None:
    with pytest.warns(RuntimeWarning, match="one class"):
        m = binary_metrics(np.zeros(4), np.array([0.1, 0.2, 0.7, 0.3]))
    assert math.isnan(m["auc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == 0.75


def test_extended_metrics_agree_with_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, brier_score_loss, cohen_kappa_score, matthews_corrcoef

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.35 + rng.random(300) * 0.65, 0, 1)
    pred = (p >= 0.5).astype(int)
    m = binary_metrics(y, p)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["auc_pr"] == pytest.approx(average_precision_score(y, p))
    assert m["npv"] == pytest.approx(m["tn"] / (m["tn"] + m["fn"]))
    assert m["fpr"] == pytest.approx(1 - m["specificity"]) and m["fnr"] == pytest.approx(1 - m["sensitivity"])


def test_ece_hand_worked() -> None:
    from covidscan.evaluate.metrics import expected_calibration_error

    # Two bins used: 0.15 (2 images, 1 positive: |0.5-0.15|) and 0.95 (2 images, both positive: |1-0.95|).
    assert expected_calibration_error(np.array([0, 1, 1, 1]), np.array([0.15, 0.15, 0.95, 0.95])) == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)


def test_bootstrap_over_groups_is_seeded_contains_the_estimate_and_is_wider_than_over_slices() -> None:
    from covidscan.evaluate.stats import bootstrap_ci

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 10)  # 20 patients, 10 near-identical slices each
    y = (groups % 2).astype(int)
    patient_score = np.clip(y[::10] * 0.3 + rng.random(20) * 0.7, 0, 1)
    score = np.repeat(patient_score, 10) + rng.normal(0, 0.01, 200)
    a = bootstrap_ci(y, score, groups, n_boot=200, seed=3)
    b = bootstrap_ci(y, score, groups, n_boot=200, seed=3)
    slices = bootstrap_ci(y, score, None, n_boot=200, seed=3)
    assert a == b
    assert a["auc"]["low"] <= a["auc"]["value"] <= a["auc"]["high"]
    assert (a["auc"]["high"] - a["auc"]["low"]) > 1.5 * (slices["auc"]["high"] - slices["auc"]["low"])


def test_mcnemar_exact_and_chi_squared() -> None:
    from covidscan.evaluate.stats import mcnemar_test

    y = np.ones(40, int)
    a = np.ones(40, int)
    b = np.ones(40, int)
    b[:10] = 0  # A right, B wrong on 10 images; never the other way
    exact = mcnemar_test(y, a, b)
    assert exact["only_a_correct"] == 10 and exact["only_b_correct"] == 0 and exact["method"] == "exact binomial"
    assert exact["p_value"] == pytest.approx(2 * 0.5**10)
    b[:30] = 0
    large = mcnemar_test(y, a, b)
    assert large["method"].startswith("chi") and large["p_value"] < 1e-6
    assert mcnemar_test(y, a, a)["p_value"] == 1.0


def test_delong_matches_auc_and_detects_a_difference() -> None:
    from covidscan.evaluate.stats import delong_test

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = y + rng.normal(0, 0.5, 400)
    poor = y + rng.normal(0, 3.0, 400)
    result = delong_test(y, good, poor)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, good))
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, poor))
    assert result["p_value"] < 1e-4
    assert delong_test(y, good, good)["p_value"] == 1.0


def test_operating_point_reaches_the_target_on_validation() -> None:
    from covidscan.evaluate.stats import threshold_for

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.2, 0.5, 0.3, 0.1, 0.05])
    t = threshold_for(y, p, sensitivity=0.75)
    assert t == 0.4 and np.mean(p[y == 1] >= t) >= 0.75
    t = threshold_for(y, p, specificity=1.0)
    assert np.mean(p[y == 0] < t) == 1.0 and t == pytest.approx(0.8)


def test_temperature_scaling_softens_overconfident_logits() -> None:
    from covidscan.evaluate.stats import fit_temperature

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    true_logit = (labels * 2 - 1) * 1.0 + rng.normal(0, 1.0, 500)  # x
    # For x ~ N(+-1, 1) the calibrated log-odds is 2x; logits of 5x need T = 5 / 2.
    logits = np.stack([np.zeros(500), 5.0 * true_logit], 1)
    assert 2.1 < fit_temperature(logits, labels) < 2.9
