"""The report measures the deployed decision: gate, calibration, study rule; honest intervals; leakage and provenance."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli_runner import CliResult, run_cli
from covidscan.decision import aggregate_scores, choose_study_rule, cross_fitted_temperature
from covidscan.evaluate.coverage import ClusteredScores, coverage
from covidscan.evaluate.intervals import binary_intervals, clustered_auc, clustered_proportion, newcombe_auc_interval, ppv_npv_at_prevalence, wilson
from covidscan.evaluate.stats import clustered_delong_test, clustered_mcnemar_test, delong_test


# --- intervals ------------------------------------------------------------------------------------------------
def test_wilson_matches_the_textbook_values_and_stays_open_at_the_boundary() -> None:
    low, high = wilson(5, 6)
    assert (round(low, 3), round(high, 3)) == (0.436, 0.970)  # Newcombe 1998, method 3
    low, high = wilson(48, 48)
    assert high == 1.0 and 0.90 < low < 0.94  # never "1.000 (1.000-1.000)"


def test_zero_false_positives_among_clustered_slices_gives_a_patient_sized_interval() -> None:
    """The issue's case: specificity 1.000 on 48 slices of 12 patients; the bootstrap said (1.000-1.000)."""
    hits = np.ones(48, bool)
    patients = np.repeat(np.arange(12), 4).astype(str)
    result = clustered_proportion(hits, patients)
    assert result["value"] == 1.0 and result["high"] == 1.0
    assert result["n_effective"] == 12  # worst-case design effect: the patients are the sample
    assert result["low"] < wilson(12, 12)[0] + 1e-9 < 0.8


def test_newcombe_auc_interval_is_valid_at_auc_one_and_narrows_with_more_patients() -> None:
    low_small, high_small = newcombe_auc_interval(1.0, 6, 6)
    low_large, _ = newcombe_auc_interval(1.0, 60, 60)
    assert high_small == 1.0 and 0.6 < low_small < 0.95 and low_small < low_large < 1.0
    low, high = newcombe_auc_interval(0.8, 20, 20)
    assert low < 0.8 < high


def test_design_effect_widens_intervals_only_when_patients_disagree_within() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(20), 5).astype(str)
    alike = np.repeat(rng.random(20) < 0.6, 5)  # every slice of a patient agrees: design effect 5
    independent = rng.random(100) < 0.6
    wide, narrow = clustered_proportion(alike, patients), clustered_proportion(independent, patients)
    assert wide["n_effective"] == pytest.approx(20, abs=2) and narrow["n_effective"] > 60
    assert wide["high"] - wide["low"] > narrow["high"] - narrow["low"]


def test_clustered_intervals_reach_nominal_coverage_where_the_naive_ones_do_not() -> None:
    """6 patients per class x 6 slices (the issue's simulation): naive Wilson/Newcombe on slices under-cover."""
    model = ClusteredScores()
    ours = coverage(lambda y, s, g: binary_intervals(y, s, 0.5, g), model, 400, "slice", seed=1)
    naive = coverage(lambda y, s, g: binary_intervals(y, s, 0.5, None), model, 400, "slice", seed=1)
    patients = coverage(lambda y, s, g: binary_intervals(y, s, 0.5, g), model, 400, "patient", seed=1)
    for metric in ("sensitivity", "specificity", "auc"):
        assert ours[metric]["coverage"] >= 0.92, (metric, ours)
        assert patients[metric]["coverage"] >= 0.92, (metric, patients)
        assert naive[metric]["coverage"] < 0.88, (metric, naive)


def test_ppv_npv_at_a_stated_prevalence_hand_worked() -> None:
    se = {"value": 0.9, "low": 0.8, "high": 0.95}
    sp = {"value": 0.8, "low": 0.7, "high": 0.9}
    out = ppv_npv_at_prevalence(se, sp, 0.1)
    assert out["ppv"]["value"] == pytest.approx(0.09 / (0.09 + 0.18))
    assert out["npv"]["value"] == pytest.approx(0.72 / (0.72 + 0.01))
    assert out["ppv"]["low"] < out["ppv"]["value"] < out["ppv"]["high"]


# --- cluster-aware comparisons ----------------------------------------------------------------------------
def test_repeating_every_slice_does_not_make_a_difference_significant() -> None:
    """Six copies of each image are not six times the evidence: clustered tests must not move."""
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 15)
    a = np.clip(y * 0.3 + rng.random(30) * 0.7, 0, 1)
    b = np.clip(y * 0.2 + rng.random(30) * 0.8, 0, 1)
    patients = np.arange(30).astype(str)
    once_m = clustered_mcnemar_test(y, a >= 0.5, b >= 0.5, patients)
    once_d = clustered_delong_test(y, a, b, patients)
    rep = lambda v: np.repeat(v, 6)  # noqa: E731
    six_m = clustered_mcnemar_test(rep(y), rep(a) >= 0.5, rep(b) >= 0.5, rep(patients))
    six_d = clustered_delong_test(rep(y), rep(a), rep(b), rep(patients))
    assert six_m["p_value"] == pytest.approx(once_m["p_value"]) and six_d["p_value"] == pytest.approx(once_d["p_value"], rel=0.05)
    naive = delong_test(rep(y), rep(a), rep(b))
    assert naive["p_value"] < six_d["p_value"] / 2  # what treating slices as independent claimed
    assert once_d["p_value"] == pytest.approx(delong_test(y, a, b)["p_value"], rel=0.25)  # (K-1)/K and per-class denominators differ


def test_clustered_auc_equals_the_plain_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    score = rng.random(50) + y * 0.3
    from covidscan.evaluate.metrics import auc_roc

    assert clustered_auc(y, score, np.arange(50))["value"] == pytest.approx(auc_roc(y, score))


# --- the decision: calibration and study rule ----------------------------------------------------------------
def test_temperature_is_dropped_when_it_does_not_help_on_held_out_patients() -> None:
    rng = np.random.default_rng(4)
    p = rng.uniform(0.05, 0.95, 120)
    y = (rng.random(120) < p).astype(int)  # calibrated by construction
    result = cross_fitted_temperature(np.stack([1 - p, p], 1), y, np.repeat(np.arange(30), 4).astype(str))
    assert not result["kept"] and result["temperature"] == 1.0 and "not kept" in result["reason"]


def test_study_rule_chosen_on_validation_prefers_top_slices_for_focal_disease() -> None:
    """COVID patients with one or two clearly positive slices among normal-looking ones: the mean dilutes them."""
    rng = np.random.default_rng(0)
    ids, ys, scores = [], [], []
    for patient in range(20):
        positive = patient % 2
        s = rng.uniform(0.05, 0.45, 8)
        if positive:
            s[:2] = rng.uniform(0.6, 0.95, 2)
        else:
            s[0] = rng.uniform(0.2, 0.7)
        ids += [f"p{patient}"] * 8
        ys += [positive] * 8
        scores += list(s)
    rule = choose_study_rule(np.array(ids), np.array(ys), np.array(scores), "auto", 3)
    assert rule["aggregation"] in ("topk", "max") and "20 patients" in rule["chosen_on"]
    assert set(rule["candidates"]) == {"mean of the slices", "max of the slices", "mean of the top 3 slices"}
    fixed = choose_study_rule(np.array(ids), np.array(ys), np.array(scores), "mean", 3)
    assert fixed["aggregation"] == "mean" and 0 < fixed["threshold"] < 1
    assert aggregate_scores([0.9, 0.1, 0.5, 0.2], {"aggregation": "topk", "k": 2}) == pytest.approx(0.7)


# --- leakage threshold -------------------------------------------------------------------------------------
def test_reissued_images_under_new_patient_ids_are_still_flagged() -> None:
    from covidscan.data.split import calibrated_threshold, leakage_report

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16))
    slices = np.repeat(base, 5, axis=0) + rng.normal(0, 0.35, (200, 16))  # 40 patients x 5 alike slices
    embeddings = slices / np.linalg.norm(slices, axis=1, keepdims=True)
    ids = np.repeat(np.arange(40), 5).astype(str)
    clean = calibrated_threshold(embeddings, ids)
    copies = embeddings[rng.choice(200, 20, replace=False)]  # 10 %: re-issued under new IDs
    contaminated = np.concatenate([embeddings, copies])
    new_ids = np.concatenate([ids, [f"new-{i}" for i in range(20)]])
    threshold = calibrated_threshold(contaminated, new_ids)
    # Copies make their patient's other slices look alike across IDs, so the threshold may rise; never to the copies.
    assert clean == 0.92 and threshold < 0.99
    held, train = np.arange(200, 220), np.arange(200)
    report = leakage_report(contaminated, held, train, threshold)
    assert report["near_duplicates"] == 20 and report["flagged"]


# --- end to end on the tiny run -------------------------------------------------------------------------
def _cli(*args: str) -> CliResult:
    return run_cli(*args)


def test_run_records_the_deployed_decision_and_evaluates_with_the_gate(tiny_run: Path) -> None:
    card = json.loads((tiny_run / "model.json").read_text())
    assert {"gate", "study_rule", "decision_settings", "tta"} <= set(card) and (tiny_run / "gate.npz").is_file()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    result = metrics["evaluation"]["sets"]["in-domain test"]
    gate = result["gate"]
    assert gate["threshold"] == pytest.approx(card["gate"]["threshold"])
    assert gate["accepted"] + gate["refused"] == metrics["split"]["counts"]["test"] == result["all_images"]["n"]
    assert result["n"] == gate["accepted"]
    predictions = pd.read_csv(tiny_run / "predictions" / "in-domain-test.csv")
    assert int(predictions["accepted"].sum()) == gate["accepted"]
    assert (predictions["accepted"] == (predictions["gate_distance"] <= card["gate"]["threshold"])).all()
    assert result["ci"]["specificity"]["low"] < result["ci"]["specificity"]["high"] or math.isnan(result["ci"]["specificity"]["low"])
    for point in result["operating_points"].values():  # operating points carry intervals and PPV/NPV at the stated prevalence
        assert {"sensitivity", "specificity"} <= set(point["ci"]) and {"ppv", "npv"} <= set(point["at_stated_prevalence"])
    assert result["prevalence"]["stated"] == 0.1 and "ppv" in result["prevalence"]["at_stated"]
    seconds = metrics["evaluation"]["seconds"]  # the evaluation profile: where the minutes go
    assert {"loading images", "model and gate", "heat maps and lung masks", "t-SNE"} <= set(seconds) and all(v >= 0 for v in seconds.values())


def test_predict_and_the_bundle_refuse_and_aggregate_as_the_report_does(tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    from covidscan.data.io import read_image
    from covidscan.predict import Predictor
    from covidscan.serve.predictor import Bundle

    predictions = pd.read_csv(tiny_run / "predictions" / "in-domain-test.csv")
    patient = predictions["patient_id"].iloc[0]
    paths = predictions.loc[predictions["patient_id"] == patient, "path"].tolist()
    noise = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)).save(noise)
    predictor, bundle = Predictor(tiny_run), Bundle(tiny_bundle)
    assert bundle.study_rule == predictor.study_rule and bundle.gate_threshold == pytest.approx(predictor.gate_threshold)
    ours = predictor.predict(paths + [str(noise)])
    served = bundle.analyse([read_image(p).pixels for p in paths + [str(noise)]], heatmaps=False)
    assert [p.in_distribution for p in ours] == [r.in_distribution for r in served]
    assert ours[-1].label == "refused" and not served[-1].in_distribution
    ours_study, served_study = predictor.study(ours), bundle.study(served)
    assert [p.lung for p in ours] == [r.lung for r in served]  # the evidence rule's lung check: the same on both stacks
    assert (ours_study.label, ours_study.used, ours_study.reason) == (served_study.label, served_study.used, served_study.reason)
    assert ours_study.probability == pytest.approx(served_study.probability, abs=1e-4, nan_ok=True)
    out = _cli("predict", str(tiny_run), *paths, str(noise), "--study")
    assert out.returncode == 0, out.stderr
    assert "refused (unlike the training data" in out.stdout and "study: " in out.stdout and "not a diagnosis" in out.stdout


def test_evaluate_overrides_refit_the_decision_on_validation_and_update_the_model_card(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "model.json").read_text())
    out = _cli("evaluate", str(run), "--set", "evaluate.target_sensitivity=0.8", "--set", "evaluate.calibrate=false",
               "--set", "evaluate.tta=true", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "model.json updated" in out.stdout
    card = json.loads((run / "model.json").read_text())
    assert card["decision_settings"]["target_sensitivity"] == 0.8 and card["tta"] is True
    assert card["calibration"]["temperature"] == 1.0 and not card["calibration"]["kept"]
    assert any(k.startswith("high sensitivity (≥ 0.8") for k in card["calibration"]["operating_points"])
    assert card["gate"] == before["gate"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluation"]["tta"] is True and metrics["model_card"]["decision_settings"]["tta"] is True
    again = _cli("evaluate", str(run), "--set", "evaluate.target_sensitivity=0.8", "--set", "evaluate.calibrate=false",
                 "--set", "evaluate.tta=true", "--quiet")
    assert again.returncode == 0 and "model.json updated" not in again.stdout  # same settings: nothing refitted

    from covidscan.data.io import read_image
    from covidscan.export.onnx import export_run
    from covidscan.predict import Predictor
    from covidscan.serve.predictor import Bundle

    export_run(run, run / "bundle")  # the served model mirror-averages too, as it was evaluated
    paths = pd.read_csv(run / "predictions" / "in-domain-test.csv")["path"].tolist()[:3]
    served = Bundle(run / "bundle").analyse([read_image(p).pixels for p in paths], heatmaps=False)
    evaluated = Predictor(run).probabilities(paths)
    plain = Predictor(tiny_run).probabilities(paths)
    assert [r.probabilities["COVID"] for r in served] == pytest.approx(evaluated[:, 1].tolist(), abs=1e-4)
    assert not np.allclose(evaluated[:, 1], plain[:, 1], atol=1e-4)


def test_external_copies_of_training_images_are_reported_as_overlap(tiny_run: Path, tmp_path: Path) -> None:
    from covidscan.data.manifest import load_manifest, save_manifest

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    frame = load_manifest(run / "manifest.csv")
    copies = frame[frame["split"] == "train"].head(6).drop(columns=["split", "group"], errors="ignore")
    copies = copies.assign(source="copied", reference_standard=["RT-PCR"] * 4 + [""] * 2)
    save_manifest(copies, tmp_path / "copied.csv")
    out = _cli("evaluate", str(run), str(tmp_path / "copied.csv"), "--quiet")
    assert out.returncode == 0, out.stderr
    result = json.loads((run / "metrics.json").read_text())["evaluation"]["sets"]["copied"]
    assert result["reference_standard"] == {"RT-PCR": 4, "unknown": 2}
    overlap = result["training_duplicates"]
    assert overlap["near_duplicates"] == 6 and overlap["test_images"] == 6
    assert "Overlap with the training data" in (run / "report.html").read_text()


def test_subgroups_by_source_in_one_evaluation_set() -> None:
    from covidscan.config import EvaluateConfig
    from covidscan.evaluate.evaluation import score_block

    rng = np.random.default_rng(0)
    n = 40
    frame = pd.DataFrame({"label": ["COVID", "non-COVID"] * (n // 2), "patient_id": [f"p{i // 2}" for i in range(n)],
                          "source": ["a"] * (n // 2) + ["b"] * (n // 2), "manufacturer": ["X"] * n})
    y = (frame["label"] == "COVID").to_numpy()
    score = np.clip(y * 0.4 + rng.random(n) * 0.6, 0, 1)
    result = score_block(frame, y, score, score, {}, EvaluateConfig(bootstrap=20), 0)
    rows = result["subgroups"]["source"]
    assert [r["value"] for r in rows] == ["a", "b"] and sum(r["images"] for r in rows) == n
    assert "manufacturer" not in result["subgroups"]  # one value: no subgroup table
    assert rows[0]["auc"]["low"] <= rows[0]["auc"]["value"] <= rows[0]["auc"]["high"]


def test_report_presentation_and_model_card_come_from_the_data(tiny_run: Path) -> None:
    page = (tiny_run / "report.html").read_text()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    best = metrics["training"]["best_epoch"]
    assert f"best epoch {best}" in page and "cross-entropy loss" in page  # loss chart: real axes, best epoch marked
    assert "n=" in page and "bins under 4 images not joined" in page  # reliability diagram: counts
    assert "heat-map colour scale" in page
    assert "uncertain provenance" not in page and "as documented by its owner" in page  # the test phantom is not a public set
    assert "figures to expect elsewhere" not in page and "not for screening" not in page
    train = metrics["data"]["by_split"]["train"]["images"]
    assert f"{train} images of" in page and metrics["data"]["images"] != train
    assert 'id="deployed"' in page and "Study rule" in page and "Input gate" in page


def test_end_of_training_summary_gives_study_level_results_with_intervals(tiny_phantom: Path, tmp_path: Path) -> None:
    from covidscan.data.manifest import save_manifest
    from covidscan.data.sources import index_folder

    from conftest import TINY

    manifest = save_manifest(index_folder(tiny_phantom), tmp_path / "m.csv")
    args = ["train", str(manifest), "-o", str(tmp_path / "run"), "--quiet"] + [a for item in TINY for a in ("--set", item)]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("in-domain test:"))
    assert "patients (" in line and "sensitivity" in line and " (0." in line  # a value with its interval
    assert "fewer than 30" in out.stdout


def test_model_card_limitations_follow_the_sources() -> None:
    from covidscan.config import RunConfig
    from covidscan.evaluate.report import _model_card_html

    def card(provenance: dict[str, object], externals: list[str]) -> str:
        metrics = {"decision_support": "Decision support only", "data": {"images": 10, "provenance": provenance}}
        return _model_card_html(metrics, {"sets": {}}, RunConfig(), ["non-COVID", "COVID"], externals)

    public = card({"sarscov2-ct": {"description": "public", "uncertain": True}}, ["ucsd"])
    assert "uncertain provenance (sarscov2-ct)" in public and "One external set cannot say" in public
    synthetic = card({"phantom": {"description": "synthetic chest-CT-like images", "uncertain": False}}, [])
    assert "uncertain provenance" not in synthetic and "synthetic images: a demonstration" in synthetic
    assert "No external data set evaluated yet" in synthetic


def test_export_cli_reports_the_run_gate_parity(tiny_run: Path, tmp_path: Path) -> None:
    out = _cli("export", str(tiny_run), "--out", str(tmp_path / "bundle"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "gate: max |Δdistance|" in out.stdout
    card = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert card["gate"]["threshold"] == pytest.approx(json.loads((tiny_run / "model.json").read_text())["gate"]["threshold"])
    assert card["parity"]["gate"]["max_abs_distance_diff"] < 1e-2


def test_quick_evaluation_keeps_every_metric_with_its_interval(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "tsne.csv").unlink()
    out = _cli("evaluate", str(run), "--quick", "--quiet")
    assert out.returncode == 0, out.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    full = json.loads((tiny_run / "metrics.json").read_text())
    quick_set, full_set = metrics["evaluation"]["sets"]["in-domain test"], full["evaluation"]["sets"]["in-domain test"]
    assert json.dumps(quick_set["metrics"]) == json.dumps(full_set["metrics"]) and set(quick_set["ci"]) == set(full_set["ci"])
    assert json.dumps(quick_set["ci"]["auc"]) == json.dumps(full_set["ci"]["auc"])  # analytic intervals do not depend on the bootstrap
    assert "explain" not in quick_set and metrics["evaluation"]["tsne"]["points"] == 0 and not (run / "tsne.csv").exists()
    assert "t-SNE" not in metrics["evaluation"]["seconds"] and "Not computed" in (run / "report.html").read_text()
