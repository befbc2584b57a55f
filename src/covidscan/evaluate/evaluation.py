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
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from covidscan import DISCLAIMER, atomic
from covidscan.atomic import read_json_object
from covidscan.config import EvaluateConfig
from covidscan.errors import DataError
from covidscan.evaluate.aggregate import aggregate_by_patient
from covidscan.evaluate.curves import pr_points, reliability_bins, roc_points
from covidscan.evaluate.metrics import binary_metrics, multiclass_metrics
from covidscan.evaluate.stats import bootstrap_ci, fit_temperature, threshold_for

IN_DOMAIN = "in-domain test"
GALLERY_CELLS = ("TP", "FN", "FP", "TN")


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log p / T): temperature scaling of probabilities (N, C)."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_calibration(val_labels: np.ndarray, val_probs: np.ndarray, cfg: EvaluateConfig) -> dict[str, object]:
    """Temperature and operating points from the validation part (never the test part)."""
    temperature = fit_temperature(np.log(np.clip(val_probs, 1e-12, 1.0)), val_labels) if cfg.calibrate else 1.0
    out: dict[str, object] = {"temperature": temperature, "fitted_on": f"validation part ({len(val_labels)} images)"}
    points: dict[str, float] = {"default": 0.5}
    if val_probs.shape[1] == 2:
        score = apply_temperature(val_probs, temperature)[:, 1]
        positive = np.asarray(val_labels) == 1
        if cfg.target_sensitivity > 0 and positive.any():
            points[f"screening (sensitivity ≥ {cfg.target_sensitivity:g} on validation)"] = threshold_for(positive, score, sensitivity=cfg.target_sensitivity)
        if cfg.target_specificity > 0 and (~positive).any():
            points[f"rule-in (specificity ≥ {cfg.target_specificity:g} on validation)"] = threshold_for(positive, score, specificity=cfg.target_specificity)
    out["operating_points"] = points
    return out


def _groups_for_ci(frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Resampling units: split groups, else patient IDs, else single images (stated)."""
    for column, name in (("group", "split groups"), ("patient_id", "patients")):
        if column in frame.columns:
            values = frame[column].astype(str)
            if (values != "").all():
                return values.to_numpy(), name
    return np.arange(len(frame)).astype(str), "images (no patient IDs)"


def score_set(
    frame: pd.DataFrame, raw: np.ndarray, calibrated: np.ndarray, classes: list[str], calibration: dict[str, object],
    cfg: EvaluateConfig, seed: int,
) -> dict[str, object]:
    """Metrics, CIs, curves, calibration and patient-level results of one data set.

    `raw`: the model's probabilities (N, C); `calibrated`: the same after temperature scaling.
    """
    labels = np.array([classes.index(str(v)) for v in frame["label"]])
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    if len(classes) > 2:
        return {"n": len(labels), "class_counts": counts, "metrics": multiclass_metrics(labels, calibrated, classes)}
    y, score = labels == 1, calibrated[:, 1]
    groups, unit = _groups_for_ci(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics, before = binary_metrics(y, score, 0.5), binary_metrics(y, raw[:, 1])
        result: dict[str, object] = {
            "n": int(len(y)),
            "class_counts": counts,
            "metrics": metrics,
            "ci": bootstrap_ci(y, score, groups, 0.5, cfg.bootstrap, seed=seed),
            "ci_unit": f"{len(np.unique(groups))} {unit}",
            "operating_points": {
                name: binary_metrics(y, score, float(t))  # type: ignore[arg-type]
                for name, t in calibration["operating_points"].items()  # type: ignore[union-attr]
            },
            "calibration": {
                "temperature": calibration["temperature"],
                "ece_before": before["ece"], "ece_after": metrics["ece"],
                "brier_before": before["brier"], "brier_after": metrics["brier"],
                "reliability": reliability_bins(y, score),
            },
            "curves": {"roc": roc_points(y, score), "pr": pr_points(y, score)},
        }
        patients = frame["patient_id"].astype(str) if "patient_id" in frame.columns else pd.Series([""] * len(frame))
        if (patients != "").all() and patients.nunique() < len(frame):
            per_patient = aggregate_by_patient(patients.to_numpy(), y, score, cfg.aggregate, cfg.top_k)
            result["patient_level"] = {
                "aggregation": cfg.aggregate + (f" (k={cfg.top_k})" if cfg.aggregate == "topk" else ""),
                "patients": int(len(per_patient)),
                "metrics": binary_metrics(per_patient["label"].to_numpy(), per_patient["score"].to_numpy(), 0.5),
                "ci": bootstrap_ci(per_patient["label"].to_numpy(), per_patient["score"].to_numpy(), None, 0.5, cfg.bootstrap, seed=seed),
            }
        else:
            missing = int((patients == "").sum())
            result["patient_level"] = {"note": f"not computed: {missing} images lack a patient ID" if missing else "not computed: one image per patient"}
    return result


def gallery_picks(y: np.ndarray, score: np.ndarray, threshold: float, per_cell: int) -> dict[str, list[int]]:
    """Indices of the most confident TP/FN/FP/TN cases (confident errors teach the most)."""
    pred = score >= threshold
    cells = {"TP": y & pred, "FN": y & ~pred, "FP": ~y & pred, "TN": ~y & ~pred}
    picks = {}
    for name, mask in cells.items():
        index = np.flatnonzero(mask)
        confidence = np.abs(score[index] - threshold)
        picks[name] = [int(i) for i in index[np.argsort(-confidence, kind="stable")][:per_cell]]
    return picks


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "set"


def explain_set(
    model: object,
    normaliser: object,
    images: np.ndarray,
    y: np.ndarray,
    score: np.ndarray,
    frame: pd.DataFrame,
    cfg: EvaluateConfig,
    out_dir: Path,
    seed: int,
) -> dict[str, object]:
    """Heat-map gallery PNGs and the lung-energy plausibility figure of one data set."""
    from covidscan.explain.cam import heatmaps
    from covidscan.explain.lung_mask import energy_inside, lung_mask
    from covidscan.explain.overlay import overlay, png_bytes

    picks = gallery_picks(y, score, 0.5, cfg.gallery_per_cell)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(images), size=min(cfg.plausibility_images, len(images)), replace=False) if len(images) else np.array([], int)
    chosen = sorted({i for cell in picks.values() for i in cell} | {int(i) for i in sample})
    heat = dict(zip(chosen, heatmaps(model, images[chosen], normaliser, target_class=1, method=cfg.cam_method)))  # type: ignore[arg-type]
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


def evaluate_run(
    run_dir: str | Path,
    externals: dict[str, pd.DataFrame] | None = None,
    cfg: EvaluateConfig | None = None,
    show: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """(Re-)evaluate a run on its test part and every external set; rewrite metrics.json and report.html.

    External manifests are copied into RUN/external/<name>.csv so that the
    run folder alone reproduces every figure; earlier ones are re-evaluated too.
    """
    import json

    import torch

    from covidscan.config import load_config
    from covidscan.data.manifest import image_refs, load_manifest, save_manifest
    from covidscan.evaluate.report import write_report
    from covidscan.models.embed import embed_array
    from covidscan.pipeline import load_image_array
    from covidscan.predict import Predictor
    from covidscan.train.engine import predict_proba

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    cfg = cfg or config.evaluate
    seed = config.split.seed
    predictor = Predictor(run_dir)
    classes = predictor.classes
    for name, frame in (externals or {}).items():
        unknown = sorted(set(frame["label"].astype(str)) - set(classes))
        if unknown:
            raise DataError(name, f"labels {unknown} are not among the model's classes {classes}; index it with the same --labels")
        save_manifest(frame, run_dir / "external" / f"{slug(name)}.csv")
    frame = load_manifest(run_dir / "manifest.csv")
    sets: dict[str, pd.DataFrame] = {IN_DOMAIN: frame[frame["split"] == "test"].reset_index(drop=True)}
    for path in sorted((run_dir / "external").glob("*.csv")):
        sets[path.stem] = load_manifest(path)
    metrics = read_json_object(run_dir / "metrics.json")
    calibration = predictor.card.get("calibration") or {"temperature": 1.0, "operating_points": {"default": 0.5}}
    model, normaliser = predictor.model, predictor.normaliser
    evaluation: dict[str, object] = {"calibration": calibration, "tta": cfg.tta, "sets": {}}
    embeddings, tsne_rows = [], []
    rng = np.random.default_rng(seed)
    train_rows = frame[frame["split"] == "train"]
    train_rows = train_rows.iloc[np.sort(rng.choice(len(train_rows), min(cfg.tsne_points, len(train_rows)), replace=False))]
    for name, part in [("training part", train_rows)] + list(sets.items()):
        images = load_image_array(image_refs(part), predictor.size, f"loading {name}", show)
        if name != "training part":
            probs = predict_proba(model, torch.from_numpy(images), normaliser, 64)
            if cfg.tta:  # test-time augmentation: mean of the image and its left-right mirror
                probs = (probs + predict_proba(model, torch.from_numpy(images[..., ::-1].copy()), normaliser, 64)) / 2
            calibrated = apply_temperature(probs, float(calibration["temperature"]))
            result = score_set(part, probs, calibrated, classes, calibration, cfg, seed)
            if len(classes) == 2:
                y = np.array([str(v) == classes[1] for v in part["label"]])
                score = calibrated[:, 1]
                result["explain"] = explain_set(model, normaliser, images, y, score, part, cfg, run_dir / "heatmaps" / slug(name), seed)
                predictions = part[["path", "slice_index", "label", "patient_id"]].copy()
                predictions["p_" + classes[1]] = score
                atomic.write_with(run_dir / "predictions" / f"{slug(name)}.csv", lambda tmp: predictions.to_csv(tmp, index=False))
                if name == IN_DOMAIN:
                    atomic.write_with(run_dir / "test_predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
            result["kind"] = "in-domain" if name == IN_DOMAIN else "external"
            result["sources"] = sorted(part["source"].astype(str).unique()) if "source" in part.columns else []
            evaluation["sets"][name] = result  # type: ignore[index]
            m = result["metrics"]
            log(f"{name}: {len(part)} images, accuracy {m['accuracy']:.3f}" + (f", AUC {m['auc']:.3f}" if "auc" in m else ""))  # type: ignore[index]
        keep = np.sort(rng.choice(len(part), min(cfg.tsne_points, len(part)), replace=False))
        embeddings.append(embed_array(model, images[keep], normaliser, show=False))
        tsne_rows.append(patient_free(part.iloc[keep]).assign(set=name))
    table = pd.concat(tsne_rows, ignore_index=True)
    evaluation["tsne"] = tsne_summary(np.concatenate(embeddings), table, seed, run_dir / "tsne.csv")
    in_domain = evaluation["sets"][IN_DOMAIN]  # type: ignore[index]
    metrics["test"] = in_domain["metrics"]
    metrics["test_ci"] = in_domain.get("ci", {})
    metrics["evaluation"] = evaluation
    metrics["decision_support"] = DISCLAIMER
    atomic.write_json(run_dir / "metrics.json", metrics)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()] if (run_dir / "history.jsonl").is_file() else []
    write_report(run_dir / "report.html", metrics, history, config, run_dir)
    return metrics


def compare_predictions(a: pd.DataFrame, b: pd.DataFrame, positive_column: str) -> dict[str, object]:
    """McNemar (decisions at 0.5) and DeLong (AUC) tests of two models on the same images."""
    from covidscan.evaluate.stats import delong_test, mcnemar_test

    keys = ["path", "slice_index"] if "slice_index" in a.columns and "slice_index" in b.columns else ["path"]
    joined = a.merge(b, on=keys, suffixes=("_a", "_b"))
    if joined.empty:
        raise DataError("predictions", "the two runs share no evaluated image; compare runs evaluated on the same data set")
    if (joined["label_a"].astype(str) != joined["label_b"].astype(str)).any():
        raise DataError("predictions", "the two runs label the same images differently")
    y = (joined["label_a"].astype(str) == positive_column.removeprefix("p_")).to_numpy()
    score_a, score_b = joined[positive_column + "_a"].to_numpy(float), joined[positive_column + "_b"].to_numpy(float)
    return {
        "images": int(len(joined)),
        "mcnemar": mcnemar_test(y, score_a >= 0.5, score_b >= 0.5),
        "delong": delong_test(y, score_a, score_b),
    }
