"""Evaluate a trained run on its own test patients and on external data sets.

Everything the report shows is computed here and stored in metrics.json:
metrics at the stated default threshold and at operating points chosen on
validation data, bootstrap CIs over patients/groups, curves, calibration,
patient-level results, heat-map gallery and lung plausibility, t-SNE.
Nothing is tuned on a test set: the temperature and the thresholds come
from the validation part of the training data set.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from covidscan import DISCLAIMER, atomic
from covidscan.atomic import read_json_object
from covidscan.config import EvaluateConfig
from covidscan.data.public_sets import describe_set
from covidscan.data.summary import data_summary
from covidscan.errors import DataError
from covidscan.decision import (
    DECISION_SETTINGS, DEFAULT_STUDY_RULE, NOT_EVALUABLE, REFUSED, EvidenceRule, apply_temperature, choose_study_rule, cross_fitted_temperature, fit_evidence_rule, rule_name,
    study_scores,
)
from covidscan.evaluate.curves import pr_points, reliability_bins, roc_points
from covidscan.evaluate.intervals import binary_intervals, clustered_auc, clustered_proportion, ppv_npv_at_prevalence
from covidscan.evaluate.metrics import binary_metrics, multiclass_metrics
from covidscan.evaluate.stats import bootstrap_ci, threshold_for

if TYPE_CHECKING:
    from covidscan.predict import DeployedScorer

IN_DOMAIN = "in-domain test"
GALLERY_CELLS = ("TP", "FN", "FP", "TN")


def fit_decision(val_frame: pd.DataFrame, val_probs: np.ndarray, classes: list[str], cfg: EvaluateConfig) -> dict[str, object]:
    """Calibration, operating points and study rule from the validation part (never the test part).

    Returns the model card fields: calibration, study_rule, tta, decision_settings.
    `val_probs` are the uncalibrated probabilities (with TTA when cfg.tta).
    """
    labels = np.array([classes.index(str(v)) for v in val_frame["label"]])
    groups, _ = _groups_for_ci(val_frame)
    if cfg.calibrate:
        calibration = cross_fitted_temperature(val_probs, labels, groups)
    else:
        calibration = {"temperature": 1.0, "kept": False, "method": "none", "reason": "calibration switched off (evaluate.calibrate=false)"}
    temperature = float(calibration["temperature"])  # type: ignore[arg-type]
    calibration["fitted_on"] = f"validation part ({len(labels)} images, {len(np.unique(groups))} patients or groups)"
    points: dict[str, float] = {"default": 0.5}
    study_rule: dict[str, object] = {**DEFAULT_STUDY_RULE, "chosen_on": "default"}
    if val_probs.shape[1] == 2:
        score = apply_temperature(val_probs, temperature)[:, 1]
        positive = labels == 1
        if cfg.target_sensitivity > 0 and positive.any():
            points[f"high sensitivity (≥ {cfg.target_sensitivity:g} on validation)"] = threshold_for(positive, score, sensitivity=cfg.target_sensitivity)
        if cfg.target_specificity > 0 and (~positive).any():
            points[f"high specificity (≥ {cfg.target_specificity:g} on validation)"] = threshold_for(positive, score, specificity=cfg.target_specificity)
        patients = val_frame["patient_id"].astype(str).to_numpy() if "patient_id" in val_frame.columns else np.array([""])
        if (patients != "").all():
            study_rule = choose_study_rule(patients, positive, score, cfg.aggregate, cfg.top_k)
        else:
            study_rule = {**DEFAULT_STUDY_RULE, "chosen_on": "default: validation images lack patient IDs"}
    calibration["operating_points"] = points
    return {
        "calibration": calibration,
        "study_rule": study_rule,
        "tta": bool(cfg.tta),
        "decision_settings": decision_settings(cfg),
    }


def lung_flags(images: np.ndarray) -> np.ndarray:
    """Whether each prepared input (N, 1, S, S) shows lung: the evidence rule's lung check, as the service makes it."""
    from covidscan.explain.lung_mask import shows_lung

    return np.array([shows_lung(image[0]) for image in images], bool)


def fit_evidence(val_frame: pd.DataFrame, accepted: np.ndarray, val_images: np.ndarray) -> EvidenceRule:
    """The evidence rule (when a study may be answered) from the validation patients' gate verdicts and lung flags.
    Without patient IDs the split's similarity groups stand in for patients (neighbouring slices of one scan)."""
    units, unit = _groups_for_ci(val_frame)
    return fit_evidence_rule(units if not unit.startswith("images") else np.full(len(val_frame), ""), accepted, lung_flags(val_images))


def decision_settings(cfg: EvaluateConfig) -> dict[str, object]:
    """The evaluate.* settings the deployed decision depends on (recorded in the model card)."""
    return {name: getattr(cfg, name) for name in DECISION_SETTINGS}


def _groups_for_ci(frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Resampling units: split groups, else patient IDs, else single images (stated)."""
    for column, name in (("group", "split groups"), ("patient_id", "patients")):
        if column in frame.columns:
            values = frame[column].astype(str)
            if (values != "").all():
                return values.to_numpy(), name
    return np.arange(len(frame)).astype(str), "images (no patient IDs)"


CI_METHOD = ("Wilson score intervals (proportions) and Newcombe score intervals (AUC) on the design-effect-adjusted "
             "number of images (patients as clusters; Student's t for few patients); bootstrap over patients/groups "
             "for the other metrics")
FEW_PATIENTS = 30  # per class: below this, every interval is wide and the figures are a pilot's
SUBGROUP_COLUMNS = ("source", "manufacturer", "scanner", "kernel", "slice_thickness")


def _intervals(y: np.ndarray, score: np.ndarray, groups: np.ndarray | None, threshold: float, cfg: EvaluateConfig, seed: int) -> dict[str, dict[str, float]]:
    ci = bootstrap_ci(y, score, groups, threshold, cfg.bootstrap, seed=seed) if cfg.bootstrap else {}
    ci.update(binary_intervals(y, score, threshold, groups))
    return ci


def score_block(
    frame: pd.DataFrame, y: np.ndarray, raw: np.ndarray, score: np.ndarray, card: dict[str, object], cfg: EvaluateConfig, seed: int,
    full: bool = True,
) -> dict[str, object]:
    """Slice-level and study-level metrics with intervals of one set of images (binary).

    `full`: also operating points, calibration, curves and subgroups.
    """
    groups, unit = _groups_for_ci(frame)
    calibration: dict[str, object] = card.get("calibration") or {}  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics = binary_metrics(y, score, 0.5)
        ci = _intervals(y, score, groups, 0.5, cfg, seed) if len(y) else {}
        result: dict[str, object] = {
            "n": int(len(y)), "metrics": metrics, "ci": ci, "ci_unit": f"{len(np.unique(groups))} {unit}", "ci_method": CI_METHOD,
        }
        result["prevalence"] = {
            "stated": cfg.prevalence,
            **({"at_stated": ppv_npv_at_prevalence(ci["sensitivity"], ci["specificity"], cfg.prevalence)} if ci else {}),
        }
        if full and len(y):
            before = binary_metrics(y, raw)
            result["operating_points"] = {}
            for name, t in calibration.get("operating_points", {"default": 0.5}).items():  # type: ignore[union-attr]
                point_ci = binary_intervals(y, score, float(t), groups)
                result["operating_points"][name] = {  # type: ignore[index]
                    "threshold": float(t), "metrics": binary_metrics(y, score, float(t)), "ci": point_ci,
                    "at_stated_prevalence": ppv_npv_at_prevalence(point_ci["sensitivity"], point_ci["specificity"], cfg.prevalence),
                }
            result["calibration"] = {
                "temperature": calibration.get("temperature", 1.0), "kept": calibration.get("kept", False),
                "ece_before": before["ece"], "ece_after": metrics["ece"],
                "brier_before": before["brier"], "brier_after": metrics["brier"],
                "reliability": reliability_bins(y, score),
            }
            result["curves"] = {"roc": roc_points(y, score), "pr": pr_points(y, score)}
            result["subgroups"] = subgroups(frame, y, score, groups)
        result["patient_level"] = patient_level(frame, y, score, card, cfg, seed)
    return result


def patient_level(frame: pd.DataFrame, y: np.ndarray, score: np.ndarray, card: dict[str, object], cfg: EvaluateConfig, seed: int) -> dict[str, object]:
    """Study-level results by the model card's rule and study threshold (what the service answers per study)."""
    rule: dict[str, object] = card.get("study_rule") or DEFAULT_STUDY_RULE  # type: ignore[assignment]
    patients = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame.columns else np.full(len(frame), "")
    if not len(patients):
        return {"note": "not computed: no images"}
    if (patients == "").any():
        return {"note": f"not computed: {int((patients == '').sum())} images lack a patient ID"}
    if len(np.unique(patients)) == len(patients):
        return {"note": "not computed: one image per patient"}
    _, labels, scores = study_scores(patients, y, score, rule)
    threshold = float(rule.get("threshold", 0.5))  # type: ignore[arg-type]
    counts = {"positive": int(labels.sum()), "negative": int((labels == 0).sum())}
    ci = _intervals(labels, scores, None, threshold, cfg, seed)
    out: dict[str, object] = {
        "aggregation": rule_name(rule), "threshold": threshold, "patients": int(len(labels)), "class_counts": counts,
        "metrics": binary_metrics(labels, scores, threshold), "ci": ci,
        "at_stated_prevalence": ppv_npv_at_prevalence(ci["sensitivity"], ci["specificity"], cfg.prevalence),
    }
    if min(counts.values()) < FEW_PATIENTS:
        out["warning"] = (f"only {min(counts.values())} patients in the smaller class (fewer than {FEW_PATIENTS}): "
                          "the intervals are wide and the figures are those of a pilot study")
    return out


def subgroups(frame: pd.DataFrame, y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> dict[str, list[dict[str, object]]]:
    """Metrics per value of the source/scanner/kernel/slice-thickness columns that vary within the set."""
    out: dict[str, list[dict[str, object]]] = {}
    for column in SUBGROUP_COLUMNS:
        if column not in frame.columns:
            continue
        values = frame[column].astype(str).replace("", "unknown").to_numpy()
        if len(np.unique(values)) < 2:
            continue
        rows = []
        for value in sorted(np.unique(values)):
            mask = values == value
            intervals = binary_intervals(y[mask], score[mask], 0.5, groups[mask])
            rows.append({"value": value, "images": int(mask.sum()), "patients_or_groups": int(len(np.unique(groups[mask]))),
                         "positives": int(y[mask].sum()), **{k: intervals[k] for k in ("sensitivity", "specificity", "auc")}})
        out[column] = rows
    return out


def _multiclass_with_intervals(labels: np.ndarray, probs: np.ndarray, classes: list[str], groups: np.ndarray) -> dict[str, object]:
    """Multi-class metrics, each class's one-vs-rest AUC with its 95 % CI (patients or split groups as clusters)."""
    metrics = multiclass_metrics(labels, probs, classes)
    per_class = metrics["per_class"]
    assert isinstance(per_class, dict)
    for index, name in enumerate(classes):
        per_class[name]["auc_ci"] = clustered_auc(labels == index, probs[:, index], groups) if len(labels) else {}
    return metrics


def study_evidence(frame: pd.DataFrame, accepted: np.ndarray, lung: np.ndarray, card: dict[str, object]) -> tuple[np.ndarray, dict[str, object]]:
    """Which patients' studies the card's evidence rule answers, as the service would: (rows of studies it withholds,
    summary). A study with no accepted slice is refused; one with too little evidence is not evaluable."""
    rule = EvidenceRule.from_json(card.get("evidence_rule"))
    patients = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame.columns else np.full(len(frame), "")
    withheld = np.zeros(len(frame), bool)
    if not len(frame) or (patients == "").any():
        return withheld, {"note": "studies not formed: images lack patient IDs", "rule": rule.describe()}
    counts = {"studies": 0, "answered": 0, "not_evaluable": 0, "refused": 0}
    examples: list[str] = []
    for patient in np.unique(patients):
        rows = patients == patient
        counts["studies"] += 1
        label, reason = rule.verdict(accepted[rows], lung[rows])  # as the service decides it (decision.study_answer)
        counts[{REFUSED: "refused", NOT_EVALUABLE: "not_evaluable"}.get(label, "answered")] += 1
        if label:
            withheld |= rows
        if label == NOT_EVALUABLE and len(examples) < 3:
            examples.append(reason)
    return withheld, {**counts, "rule": rule.describe(), "chosen_on": rule.chosen_on, "examples": examples}


def score_set(
    frame: pd.DataFrame, raw: np.ndarray, distances: np.ndarray, classes: list[str], card: dict[str, object],
    gate_threshold: float, cfg: EvaluateConfig, seed: int, lung: np.ndarray | None = None,
) -> dict[str, object]:
    """One evaluation set as deployed (images the gate accepts) and, side by side, on all images.

    `raw`: the model's uncalibrated probabilities (N, C); `distances`: the gate's; `lung`: whether each image shows
    lung (the evidence rule; None: not checked, every image counts as showing lung). Study-level figures count only
    the studies the service would answer; the others are counted as refused or not evaluable.
    """
    labels = np.array([classes.index(str(v)) for v in frame["label"]])
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    temperature = float((card.get("calibration") or {}).get("temperature", 1.0))  # type: ignore[union-attr]
    calibrated = apply_temperature(raw, temperature)
    accepted = np.asarray(distances) <= gate_threshold
    units = _groups_for_ci(frame)[0]
    gate = {
        "threshold": gate_threshold if math.isfinite(gate_threshold) else None,
        "accepted": int(accepted.sum()), "refused": int((~accepted).sum()),
        "refusal_rate": clustered_proportion(~accepted, units) if len(frame) else {},
        "refused_by_class": {c: int((~accepted & (labels == i)).sum()) for i, c in enumerate(classes)},
        "units": int(len(np.unique(units))), "accepted_units": int(len(np.unique(units[accepted]))),
    }
    if len(classes) > 2:
        groups = units
        return {"n": len(labels), "class_counts": counts, "gate": gate,
                "metrics": _multiclass_with_intervals(labels[accepted], calibrated[accepted], classes, groups[accepted]),
                "all_images": {"n": len(labels), "metrics": _multiclass_with_intervals(labels, calibrated, classes, groups)}}
    y = labels == 1
    kept = frame[accepted].reset_index(drop=True)
    result = score_block(kept, y[accepted], raw[accepted, 1], calibrated[accepted, 1], card, cfg, seed)
    withheld, evidence = study_evidence(frame, accepted, np.ones(len(frame), bool) if lung is None else np.asarray(lung, bool), card)
    if evidence.get("not_evaluable"):  # the study figures are those of the studies the service answers
        answered = accepted & ~withheld
        result["patient_level"] = patient_level(frame[answered].reset_index(drop=True), y[answered], calibrated[answered, 1], card, cfg, seed)
    result.update({"class_counts": counts, "gate": gate, "study_evidence": evidence})
    result["all_images"] = score_block(frame, y, raw[:, 1], calibrated[:, 1], card, cfg, seed, full=False)
    return result


def gallery_picks(y: np.ndarray, score: np.ndarray, threshold: float, per_cell: int, units: np.ndarray | None = None) -> dict[str, list[int]]:
    """Indices of the most confident TP/FN/FP/TN cases (confident errors teach the most), at most one per patient or
    group in a cell: three neighbouring slices of one patient would show one case three times."""
    pred = score >= threshold
    cells = {"TP": y & pred, "FN": y & ~pred, "FP": ~y & pred, "TN": ~y & ~pred}
    units = np.arange(len(y)).astype(str) if units is None else np.asarray(units)
    picks = {}
    for name, mask in cells.items():
        index = np.flatnonzero(mask)
        confidence = np.abs(score[index] - threshold)
        chosen: list[int] = []
        seen: set[str] = set()
        for i in index[np.argsort(-confidence, kind="stable")]:
            if len(chosen) == per_cell:
                break
            if str(units[i]) not in seen:
                seen.add(str(units[i]))
                chosen.append(int(i))
        picks[name] = chosen
    return picks


# An external set is evaluable with a model only when its gate accepts at least this share of the images and this
# many patients or groups: figures on a sliver the gate let through describe the sliver, not the hospital.
EVALUABLE_SHARE = 0.5
EVALUABLE_UNITS = 10


def evaluability(gate: dict[str, object]) -> dict[str, object]:
    """Whether a set's gated figures may be read as the model's performance on it, and why not."""
    accepted, refused = int(gate["accepted"]), int(gate["refused"])  # type: ignore[call-overload]
    total = accepted + refused
    share = accepted / total if total else 0.0
    reasons = []
    if share < EVALUABLE_SHARE:
        reasons.append(f"the gate accepted {accepted} of {total} images ({share:.0%}; at least {EVALUABLE_SHARE:.0%} needed)")
    units = int(gate.get("accepted_units", accepted))  # type: ignore[call-overload]
    if units < EVALUABLE_UNITS:
        reasons.append(f"only {units} patients or groups accepted (at least {EVALUABLE_UNITS} needed)")
    return {"evaluable": not reasons, "accepted_share": share, "reasons": reasons,
            "rule": f"evaluable when the gate accepts at least {EVALUABLE_SHARE:.0%} of the images and {EVALUABLE_UNITS} patients or groups"}


def gate_check(gate: dict[str, object]) -> dict[str, object]:
    """In-domain, the gate should refuse about its target share (1 - its validation quantile); above it beyond the CI,
    the gate refuses the model's own kind of images and is miscalibrated."""
    from covidscan.gate import GATE_QUANTILE

    target = 1.0 - GATE_QUANTILE
    rate = gate.get("refusal_rate") or {}
    assert isinstance(rate, dict)
    low = float(rate.get("low", math.nan))
    return {"target": target, "refusal_rate": rate.get("value"), "ci_low": low,
            "miscalibrated": bool(math.isfinite(low) and low > target)}


WORST_UNITS = 10  # patients or groups listed in the error analysis
CONFIDENT_ERRORS = 12  # most confident wrong slices listed
WRONG_SLICES_PER_UNIT = 3


def _display_unit(unit: str, unit_name: str) -> str:
    """A patient as a keyed hash (a folder name may be a record number; a patient split's groups are patient IDs);
    similarity clusters and single images as they are."""
    from covidscan.data.pseudonym import patient_key

    if unit_name.startswith("images"):
        return ""  # the image is its own unit: nothing to add to its name
    if re.fullmatch(r"(cluster|image)-\d+", unit):
        return unit
    return patient_key(unit)


def _slice_name(row: pd.Series) -> str:
    name = Path(str(row["path"])).name
    index = str(row.get("slice_index", "")).strip()
    return f"{name} [slice {int(float(index))}]" if index not in ("", "nan") else name


def error_analysis(frame: pd.DataFrame, y: np.ndarray, score: np.ndarray, classes: list[str], threshold: float = 0.5) -> dict[str, object]:
    """Where the errors concentrate (images the gate accepted, threshold 0.5): the patients or groups with the most wrong
    slices, each with its most confident wrong slices, and the most confident wrong slices of the set."""
    units, unit_name = _groups_for_ci(frame)
    wrong = (score >= threshold) != y
    confidence = np.abs(score - threshold)
    worst = []
    if wrong.any() and not unit_name.startswith("images"):  # without patients or groups, each image is its own unit
        table = pd.DataFrame({"unit": units, "wrong": wrong, "y": y})
        per = table.groupby("unit").agg(images=("wrong", "size"), errors=("wrong", "sum"), positive=("y", "mean"))
        per["share"] = per["errors"] / per["images"]
        per = per[per["errors"] > 0].sort_values(["errors", "share"], ascending=False, kind="stable").head(WORST_UNITS)
        for unit, row in per.iterrows():
            index = np.flatnonzero((units == unit) & wrong)
            index = index[np.argsort(-confidence[index], kind="stable")][:WRONG_SLICES_PER_UNIT]
            worst.append({
                "unit": _display_unit(str(unit), unit_name), "true": classes[1] if row["positive"] >= 0.5 else classes[0],
                "images": int(row["images"]), "errors": int(row["errors"]), "share": float(row["share"]),
                "wrong_slices": [{"image": _slice_name(frame.iloc[i]), "p_positive": float(score[i])} for i in index],
            })
    index = np.flatnonzero(wrong)
    index = index[np.argsort(-confidence[index], kind="stable")][:CONFIDENT_ERRORS]
    confident = [{"image": _slice_name(frame.iloc[i]), "true": classes[int(y[i])], "p_positive": float(score[i]),
                  "unit": _display_unit(str(units[i]), unit_name)} for i in index]
    listed = sum(int(w["errors"]) for w in worst)  # type: ignore[call-overload]
    return {"threshold": threshold, "unit": unit_name, "images": int(len(y)), "errors": int(wrong.sum()),
            "units_with_errors": int(len(np.unique(units[wrong]))), "units": int(len(np.unique(units))),
            "errors_in_listed": listed, "worst": worst, "confident_errors": confident}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "set"


def explain_set(
    scorer: DeployedScorer,
    images: np.ndarray,
    y: np.ndarray,
    score: np.ndarray,
    frame: pd.DataFrame,
    cfg: EvaluateConfig,
    out_dir: Path,
    seed: int,
) -> dict[str, object]:
    """Heat-map gallery PNGs and the lung-energy plausibility figure of one data set."""
    from covidscan.explain.lung_mask import energy_inside, lung_mask
    from covidscan.explain.overlay import overlay, png_bytes

    picks = gallery_picks(y, score, 0.5, cfg.gallery_per_cell, _groups_for_ci(frame)[0])
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(images), size=min(cfg.plausibility_images, len(images)), replace=False) if len(images) else np.array([], int)
    chosen = sorted({i for cell in picks.values() for i in cell} | {int(i) for i in sample})
    heat = dict(zip(chosen, scorer.heatmaps(images[chosen], target_class=1, method=cfg.cam_method)))
    masks = {i: lung_mask(images[i, 0]) for i in chosen}  # each mask once
    gallery = []
    for cell in GALLERY_CELLS:
        for rank, i in enumerate(picks[cell]):
            name = f"{cell}-{rank}.png"
            atomic.write_bytes(out_dir / name, png_bytes(overlay(images[i, 0], heat[i])))
            gallery.append({
                "cell": cell, "file": f"{out_dir.parent.name}/{out_dir.name}/{name}", "label": str(frame["label"].iloc[i]),
                "p_positive": float(score[i]), "lung_energy": energy_inside(heat[i], masks[i]),
            })
    sampled = [int(i) for i in sample]
    energies = np.array([energy_inside(heat[i], masks[i]) for i in sampled], float)
    areas = np.array([masks[i].mean() for i in sampled if masks[i] is not None], float)
    found = energies[~np.isnan(energies)]
    return {
        "method": cfg.cam_method,
        "gallery": gallery,
        "plausibility": {
            "images": len(sampled), "with_lung_mask": int(len(found)),
            "mean_lung_energy": float(found.mean()) if len(found) else math.nan,
            "median_lung_energy": float(np.median(found)) if len(found) else math.nan,
            "mean_lung_area": float(areas.mean()) if len(areas) else math.nan,
        },
    }


def tsne_summary(
    embeddings: np.ndarray, table: pd.DataFrame, seed: int, out_csv: Path
) -> dict[str, object]:
    """t-SNE map (written to tsne.csv) and silhouettes of class, source and data set in embedding space."""
    from covidscan.explain.embedding import silhouette, tsne_2d

    coords = tsne_2d(embeddings, seed)
    table = table.assign(x=coords[:, 0], y=coords[:, 1])
    atomic.write_with(out_csv, lambda tmp: table.to_csv(tmp, index=False))
    return {
        "points": int(len(table)),
        "file": out_csv.name,
        "silhouette": {column: silhouette(embeddings, table[column].to_numpy()) for column in ("label", "source", "set")},
    }


def patient_free(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns a report may show: no patient IDs."""
    return frame[[c for c in ("label", "source", "split") if c in frame.columns]]


class PhaseTimer:
    """Wall seconds per evaluation phase, summed over sets (metrics.json "seconds": where the minutes go)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - started, 2)


def fit_run_gate(train_stats: np.ndarray, val_stats: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The input gate of a run from gate statistics (`Predictor.score`): training reference, threshold from validation."""
    from covidscan.gate import GATE_ARRAYS, GATE_METHOD, GATE_QUANTILE, gate_reference

    fitted = gate_reference(train_stats, val_stats)
    card = {"method": GATE_METHOD, "threshold": fitted["threshold"], "quantile_of_validation": GATE_QUANTILE,
            "reference_images": int(len(train_stats)), "validation_images": int(len(val_stats)), "file": "gate.npz"}
    return {k: np.asarray(fitted[k]) for k in GATE_ARRAYS}, card


GATE_IMAGES = 1024  # at most this many training (and validation) images fit the gate


def gate_sample(count: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most GATE_IMAGES of `count` images: the images a run's gate is fitted on."""
    return np.sort(np.random.default_rng(seed).choice(count, min(GATE_IMAGES, count), replace=False))


def ensure_decision(run_dir: Path, frame: pd.DataFrame, cfg: EvaluateConfig, show: bool, log: Callable[[str], None]) -> DeployedScorer:
    """The run's scorer, with its gate and decision refitted on validation when `cfg` asks for another decision.

    An override such as evaluate.target_sensitivity=0.8 or evaluate.tta=true must
    change what is evaluated *and* what is served: the new calibration,
    operating points and study rule are fitted on the validation part and
    written into model.json (export again to serve them).
    """
    from covidscan.data.manifest import image_refs
    from covidscan.gate import save_gate
    from covidscan.predict import MODEL_CARD, load_scorer

    predictor = load_scorer(run_dir)
    card = read_json_object(run_dir / MODEL_CARD)  # as on disk: every field kept (an ensemble's members carry more than the typed card)
    reasons = []
    if not predictor.has_gate:
        train, val = (frame[frame["split"] == part] for part in ("train", "val"))
        train_stats, val_stats = (
            predictor.score(predictor.load_images(image_refs(rows.iloc[gate_sample(len(rows))]), f"gate: {part} images", show), tta=False)[1]
            for part, rows in (("train", train), ("val", val)))
        arrays, card["gate"] = fit_run_gate(train_stats, val_stats)
        save_gate(arrays, run_dir / "gate.npz")
        reasons.append("the run had no input gate; fitted one on its training and validation images")
    wanted = decision_settings(cfg)
    recorded = card.get("decision_settings")
    if recorded != wanted or "study_rule" not in card or "evidence_rule" not in predictor.model_card.raw:  # (to_json fills a default)
        changed = [k for k in wanted if not isinstance(recorded, dict) or recorded.get(k) != wanted[k]]
        val = frame[frame["split"] == "val"].reset_index(drop=True)
        images = predictor.load_images(image_refs(val), "loading validation images", show)
        probs, stats = predictor.score(images, tta=cfg.tta)
        card.update(fit_decision(val, probs, predictor.classes, cfg))
        card["evidence_rule"] = fit_evidence(val, predictor.gate_distances(stats) <= predictor.gate_threshold, images).to_json()
        reasons.append("calibration, operating points, study rule and evidence rule refitted on the validation part"
                       + (f" for {', '.join(f'evaluate.{k}={wanted[k]}' for k in changed)}" if isinstance(recorded, dict) and changed
                          else " (older run)"))
    if reasons:
        atomic.write_json(run_dir / MODEL_CARD, card)
        for reason in reasons:
            log(f"model.json updated: {reason}; export the run again to serve it")
        predictor = load_scorer(run_dir)
    return predictor


def training_duplicates(run_dir: Path, frame: pd.DataFrame, name: str, part: pd.DataFrame, show: bool) -> dict[str, object]:
    """Images of an external set with a near duplicate among the run's training/validation images."""
    from covidscan.data.split import leakage_report, leakage_threshold
    from covidscan.models.embed import manifest_embeddings

    in_training = frame["split"].isin(["train", "val"]).to_numpy()
    trained = frame[in_training].reset_index(drop=True)
    # The split already embedded the whole manifest (run_dir/embeddings.npz): reuse it, do not embed the images again.
    seen = manifest_embeddings(frame, run_dir / "embeddings.npz", show=show)[in_training]
    held = manifest_embeddings(part, run_dir / "external" / f"{slug(name)}.embeddings.npz", show=show)
    threshold = leakage_threshold(trained, seen)
    report = leakage_report(np.concatenate([held, seen]), np.arange(len(held)), np.arange(len(held), len(held) + len(seen)), threshold)
    report["compared_with"] = f"{len(seen)} training and validation images"
    return report


def evaluate_run(
    run_dir: str | Path,
    externals: dict[str, pd.DataFrame] | None = None,
    cfg: EvaluateConfig | None = None,
    show: bool = True,
    log: Callable[[str], None] = print,
    metrics: dict[str, object] | None = None,
    started: float | None = None,
) -> dict[str, object]:
    """(Re-)evaluate a run as deployed on its test part and every external set; rewrite metrics.json and report.html.

    As deployed: the run's input gate refuses images (metrics on the accepted
    ones, and on all images side by side), probabilities are calibrated as
    recorded, and studies are decided by the model card's rule.
    External manifests are copied into RUN/external/<name>.csv so that the
    run folder alone reproduces every figure; earlier ones are re-evaluated too.
    `metrics`: the training summary in memory (training hands it over); else metrics.json.
    `started`: perf_counter() when training began, to record the run's wall time.
    """
    import json

    from covidscan.config import load_config
    from covidscan.data.manifest import image_refs, load_manifest, save_manifest
    from covidscan.evaluate.report import write_report
    from covidscan.predict import MODEL_CARD

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    cfg = cfg or config.evaluate
    seed = config.split.seed
    frame = load_manifest(run_dir / "manifest.csv")
    timer = PhaseTimer()
    with timer("decision and gate (refitted only when missing or changed)"):
        predictor = ensure_decision(run_dir, frame, cfg, show, log)
    classes, card = predictor.classes, predictor.card
    for name, external in (externals or {}).items():
        unknown = sorted(set(external["label"].astype(str)) - set(classes))
        if unknown:
            raise DataError(name, f"labels {unknown} are not among the model's classes {classes}; index it with the same --labels")
        save_manifest(external, run_dir / "external" / f"{slug(name)}.csv")
    sets: dict[str, pd.DataFrame] = {IN_DOMAIN: frame[frame["split"] == "test"].reset_index(drop=True)}
    for path in sorted((run_dir / "external").glob("*.csv")):
        sets[path.stem] = load_manifest(path)
    metrics = dict(metrics) if metrics is not None else read_json_object(run_dir / "metrics.json")
    recorded = metrics.get("data") or {}
    assert isinstance(recorded, dict)
    # Counts and descriptions from the run's own manifest (a run evaluated again gets today's data description);
    # the audit's verdict is the one made at training time.
    metrics["data"] = data_summary(frame, recorded.get("audit"))  # type: ignore[arg-type]
    evaluation: dict[str, object] = {
        "calibration": card.get("calibration"), "study_rule": card.get("study_rule"), "evidence_rule": card.get("evidence_rule"), "gate": card.get("gate"),
        "tta": bool(card.get("tta", False)), "prevalence": cfg.prevalence, "sets": {},
    }
    embeddings, tsne_rows = [], []
    rng = np.random.default_rng(seed)
    train_rows = frame[frame["split"] == "train"]
    train_rows = train_rows.iloc[np.sort(rng.choice(len(train_rows), min(cfg.tsne_points, len(train_rows)), replace=False))]
    for name, part in [("training part", train_rows)] + list(sets.items()):
        with timer("loading images"):
            images = predictor.load_images(image_refs(part), f"loading {name}", show)
        if name != "training part":
            with timer("model and gate"):
                raw, gate_stats = predictor.score(images)
            distances = predictor.gate_distances(gate_stats)
            with timer("lung check (evidence rule)"):
                lung = lung_flags(images)
            with timer("metrics and intervals (bootstrap included)"):
                result = score_set(part, raw, distances, classes, card, predictor.gate_threshold, cfg, seed, lung)
            calibrated = predictor.calibrated(raw)
            if len(classes) == 2:
                y = np.array([str(v) == classes[1] for v in part["label"]])
                score = calibrated[:, 1]
                if cfg.gallery_per_cell or cfg.plausibility_images:  # both 0 in a quick evaluation
                    with timer("heat maps and lung masks"):
                        result["explain"] = explain_set(predictor, images, y, score, part, cfg, run_dir / "heatmaps" / slug(name), seed)
            # every class's probability (binary: the positive class's), for pooled and per-class analyses
            columns = [c for c in ("path", "slice_index", "label", "patient_id", "group") if c in part.columns]
            predictions = part[columns].copy()
            for index, name_of_class in enumerate(classes):
                if len(classes) > 2 or index == 1:
                    predictions["p_" + name_of_class] = calibrated[:, index]
            predictions["gate_distance"] = distances
            predictions["accepted"] = distances <= predictor.gate_threshold
            atomic.write_with(run_dir / "predictions" / f"{slug(name)}.csv", lambda tmp: predictions.to_csv(tmp, index=False))
            if name == IN_DOMAIN:
                atomic.write_with(run_dir / "test_predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
            result["kind"] = "in-domain" if name == IN_DOMAIN else "external"
            gate = result["gate"]
            assert isinstance(gate, dict)
            if name == IN_DOMAIN:
                result["gate_check"] = gate_check(gate)
            else:
                result["evaluable"] = evaluability(gate)
            if len(classes) == 2:
                accepted = distances <= predictor.gate_threshold
                result["errors"] = error_analysis(part[accepted].reset_index(drop=True), y[accepted], score[accepted], classes)
            result["sources"] = sorted(part["source"].astype(str).unique()) if "source" in part.columns else []
            result["description"] = describe_set(part)
            if name != IN_DOMAIN:
                with timer("overlap with training images (embeddings reused)"):
                    result["training_duplicates"] = training_duplicates(run_dir, frame, name, part, show)
            if "reference_standard" in part.columns:
                result["reference_standard"] = {str(k or "unknown"): int(v) for k, v in part["reference_standard"].astype(str).value_counts().items()}
            evaluation["sets"][name] = result  # type: ignore[index]
            log(f"evaluated {name}: {len(part)} images")
        if cfg.tsne_points:
            keep = np.sort(rng.choice(len(part), min(cfg.tsne_points, len(part)), replace=False))
            with timer("t-SNE"):
                embeddings.append(predictor.embed(images[keep]))
            tsne_rows.append(patient_free(part.iloc[keep]).assign(set=name))
    if tsne_rows:
        table = pd.concat(tsne_rows, ignore_index=True)
        with timer("t-SNE"):
            evaluation["tsne"] = tsne_summary(np.concatenate(embeddings), table, seed, run_dir / "tsne.csv")
    else:
        evaluation["tsne"] = {"points": 0, "note": "not computed (evaluate.tsne_points=0)"}
    evaluation["seconds"] = timer.seconds
    in_domain = evaluation["sets"][IN_DOMAIN]  # type: ignore[index]
    metrics["test"] = {**in_domain["metrics"], "n": in_domain["n"]}
    metrics["test_ci"] = in_domain.get("ci", {})
    metrics["evaluation"] = evaluation
    metrics["decision_support"] = DISCLAIMER
    validation = validated_figures(evaluation["sets"])  # type: ignore[arg-type]
    # Into model.json as it is on disk (every field kept); it travels into the bundle: the page, printout and SR state it.
    atomic.write_json(run_dir / MODEL_CARD, {**read_json_object(run_dir / MODEL_CARD), "validation": validation})
    metrics["model_card"] = {k: card.get(k) for k in ("calibration", "study_rule", "evidence_rule", "gate", "tta", "decision_settings", "members", "combiner",
                                                      "decomposition", "adaptation", "local_finetune", "pretrained_from") if k in card}
    metrics["model_card"]["validation"] = validation  # type: ignore[index]
    if started is not None:
        metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic.write_json(run_dir / "metrics.json", metrics)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()] if (run_dir / "history.jsonl").is_file() else []
    write_report(run_dir / "report.html", metrics, history, config, run_dir)
    return metrics


def _figure(value: object, ci: object) -> dict[str, float] | None:
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    ci = ci if isinstance(ci, dict) else {}
    return {"value": round(float(value), 4), "low": round(float(ci.get("low", math.nan)), 4), "high": round(float(ci.get("high", math.nan)), 4)}


def _at_chance(figure: dict[str, float] | None) -> bool:
    return figure is not None and figure["low"] <= 0.5 <= figure["high"]


def validated_figures(sets: dict[str, dict[str, object]]) -> dict[str, object]:
    """What the model card tells every reader beside an answer: each evaluated set's slice and study AUC with CIs,
    its refusal rate and whether it was evaluable, and one plain statement of them."""
    figures: dict[str, dict[str, object]] = {}
    sentences: list[str] = []
    for name, result in sets.items():
        gate, metrics, ci = result.get("gate") or {}, result.get("metrics") or {}, result.get("ci") or {}
        patient = result.get("patient_level") or {}
        assert isinstance(gate, dict) and isinstance(metrics, dict) and isinstance(ci, dict) and isinstance(patient, dict)
        total = int(gate.get("accepted", 0)) + int(gate.get("refused", 0))
        evaluable = (result.get("evaluable") or {}).get("evaluable", True)  # type: ignore[union-attr]
        slice_auc = _figure(metrics.get("auc"), ci.get("auc"))
        study_auc = _figure((patient.get("metrics") or {}).get("auc"), (patient.get("ci") or {}).get("auc"))
        refused = float(gate.get("refused", 0)) / total if total else 0.0
        sources = ", ".join(str(s) for s in result.get("sources") or [])  # type: ignore[union-attr]
        points = result.get("operating_points") or {}
        description = result.get("description") or {}
        assert isinstance(points, dict) and isinstance(description, dict)
        figures[name] = {
            "kind": result.get("kind"), "sources": sources, "images": total, "refused_share": round(refused, 4),
            "evaluable": bool(evaluable), "slice_auc": slice_auc, "study_auc": study_auc, "patients": patient.get("patients"),
            "operating_points": {point: {"threshold": round(float(v["threshold"]), 4), "sensitivity": _figure(v["metrics"]["sensitivity"], v["ci"].get("sensitivity")),
                                         "specificity": _figure(v["metrics"]["specificity"], v["ci"].get("specificity"))}
                                 for point, v in points.items()},
            "data": {source: d.get("description") for source, d in (description.get("provenance") or {}).items()},  # type: ignore[union-attr]
        }
        auc_text = (f"slice AUC {slice_auc['value']:.2f} (95% CI {slice_auc['low']:.2f}-{slice_auc['high']:.2f})" if slice_auc else "")
        if study_auc:
            auc_text += f", study AUC {study_auc['value']:.2f} ({study_auc['low']:.2f}-{study_auc['high']:.2f}, {patient.get('patients')} patients)"
        if result.get("kind") == "in-domain":
            sentences.insert(0, f"Validated on held-out patients of {sources} ({total} images): {auc_text or 'see the report'}.")
        elif not evaluable:
            sentences.append(f"On another data set ({sources}) it was not evaluable: the input gate refused {refused:.0%} of its images.")
        elif _at_chance(slice_auc):
            sentences.append(f"On another data set ({sources}) it was at chance: {auc_text}, {refused:.0%} of its images refused.")
        else:
            sentences.append(f"On another data set ({sources}): {auc_text}, {refused:.0%} of its images refused.")
    if not any(r.get("kind") == "external" for r in sets.values()):
        sentences.append("It was not measured on another hospital's images: how it performs there is unknown.")
    return {"sets": figures, "statement": " ".join(sentences)}


def _with_ci(value: float, ci: dict[str, float] | None) -> str:
    if ci is None or math.isnan(value):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return f"{value:.3f} ({ci['low']:.3f}-{ci['high']:.3f})"


def set_summary(name: str, result: dict[str, object]) -> str:
    """One line per evaluation set: refusals, study-level and slice-level figures with 95 % CIs."""
    gate, m, ci = result.get("gate") or {}, result["metrics"], result.get("ci") or {}
    assert isinstance(gate, dict) and isinstance(m, dict) and isinstance(ci, dict)
    parts = [f"{name}: {result['n']} images accepted, {gate.get('refused', 0)} refused by the gate"]
    evaluable = result.get("evaluable") or {}
    assert isinstance(evaluable, dict)
    if result.get("kind") == "external" and evaluable.get("evaluable") is False:
        everything = result.get("all_images") or {}
        assert isinstance(everything, dict)
        all_auc = (everything.get("metrics") or {}).get("auc", math.nan)  # type: ignore[union-attr]
        return (f"{name}: NOT EVALUABLE with this model: {'; '.join(evaluable['reasons'])}"  # type: ignore[arg-type]
                f"; ungated slice AUC on all {everything.get('n', '?')} images {_with_ci(all_auc, (everything.get('ci') or {}).get('auc'))}")  # type: ignore[union-attr]
    if "auc" in m:
        parts.append(f"slices AUC {_with_ci(m['auc'], ci.get('auc'))}")
    patient = result.get("patient_level") or {}
    assert isinstance(patient, dict)
    if "metrics" in patient:
        pm, pci = patient["metrics"], patient["ci"]
        parts.append(f"{patient['patients']} patients ({patient['aggregation']}, threshold {patient['threshold']:.2f}): "
                     + ", ".join(f"{k} {_with_ci(pm[k], pci.get(k))}" for k in ("sensitivity", "specificity", "auc")))
    elif "accuracy" in m:
        parts.append(f"accuracy {_with_ci(m['accuracy'], ci.get('accuracy'))}")
    return "; ".join(parts)


def compare_predictions(
    a: pd.DataFrame, b: pd.DataFrame, positive_column: str, rules: tuple[dict[str, object], dict[str, object]] | None = None
) -> dict[str, object]:
    """Two models on the same images, with a patient's slices as one unit (never slices as independent).

    Slices: clustered McNemar (decisions at 0.5) and clustered DeLong (AUC).
    Patients (when IDs exist): each model's study rule, exact McNemar on the
    study decisions and DeLong on the study probabilities. All images, gate ignored
    (the two models' gates refuse different images).
    """
    from covidscan.evaluate.stats import clustered_delong_test, clustered_mcnemar_test, delong_test, mcnemar_test

    keys = ["path", "slice_index"] if "slice_index" in a.columns and "slice_index" in b.columns else ["path"]
    joined = a.merge(b, on=keys, suffixes=("_a", "_b"))
    if joined.empty:
        raise DataError("predictions", "the two runs share no evaluated image; compare runs evaluated on the same data set")
    if (joined["label_a"].astype(str) != joined["label_b"].astype(str)).any():
        raise DataError("predictions", "the two runs label the same images differently")
    y = (joined["label_a"].astype(str) == positive_column.removeprefix("p_")).to_numpy()
    score_a, score_b = joined[positive_column + "_a"].to_numpy(float), joined[positive_column + "_b"].to_numpy(float)
    patients = joined["patient_id_a"].astype(str).to_numpy() if "patient_id_a" in joined.columns else np.full(len(joined), "")
    has_ids = bool(len(patients)) and bool((patients != "").all())
    # Patients as units; without IDs the split's similarity groups (the CIs' units), else single images (stated).
    if has_ids:
        units, unit_name = patients, "patients"
    else:
        units, unit_name = _groups_for_ci(joined.rename(columns={"group_a": "group"}))
    result: dict[str, object] = {
        "images": int(len(joined)),
        "units": f"{len(np.unique(units))} {unit_name}",
        "mcnemar": clustered_mcnemar_test(y, score_a >= 0.5, score_b >= 0.5, units),
        "delong": clustered_delong_test(y, score_a, score_b, units),
    }
    if has_ids and len(np.unique(patients)) < len(patients):
        rule_a, rule_b = rules or (DEFAULT_STUDY_RULE, DEFAULT_STUDY_RULE)
        _, labels, study_a = study_scores(patients, y, score_a, rule_a)
        _, _, study_b = study_scores(patients, y, score_b, rule_b)
        result["patient_level"] = {
            "patients": int(len(labels)),
            "mcnemar": mcnemar_test(labels, study_a >= float(rule_a.get("threshold", 0.5)), study_b >= float(rule_b.get("threshold", 0.5))),  # type: ignore[arg-type]
            "delong": delong_test(labels, study_a, study_b),
        }
    return result
