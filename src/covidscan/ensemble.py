"""Ensembles of trained runs: soft vote, weighted vote or stacking, as a run folder like any other.

`build_ensemble` copies its members into OUT/members/, checks that they share
one split, fits the combiner on validation predictions only (`fit_combiner`
refuses anything else), fits the ensemble's own calibration, operating
points and study rule on the same validation part, then evaluates it exactly
as a single run is evaluated. The input gate of an ensemble accepts an image
only when every member's gate does.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from covidscan import DISCLAIMER, __version__, atomic
from covidscan.combine import METHODS, combine, heatmap_weights, stacking_features
from covidscan.config import EvaluateConfig
from covidscan.decision import log_loss
from covidscan.errors import CovidscanError, DataError
from covidscan.model_card import ENSEMBLE, NETWORK, ModelCard, read_model_card
from covidscan.predict import MODEL_CARD, DeployedScorer, Predictor

GATE_RULE = "every member's input gate must accept the image (distance / member threshold <= 1)"
MEMBER_FILES = ("model.json", "gate.npz", "config.yaml", "metrics.json", "manifest.csv", "history.jsonl", "checkpoints/best.safetensors")


class EnsemblePredictor(DeployedScorer):
    """The members' deployed probabilities combined by the card's combiner."""

    def __init__(self, folder: str | Path, card: ModelCard) -> None:
        self.folder, self.model_card = Path(folder), card
        self.members = [Predictor(self.folder / m.folder) for m in card.members]
        for member, spec in zip(self.members, card.members):
            if member.size != card.size or member.classes != card.classes:
                raise CovidscanError(f"{self.folder / spec.folder}: member has classes {member.classes} at {member.size} px; "
                                     f"the ensemble has {card.classes} at {card.size} px")

    @property
    def has_gate(self) -> bool:
        return True

    def score(self, images: np.ndarray, batch_size: int = 64, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        probs, ratios = member_probabilities(self.members, images, batch_size, self.model_card.tta if tta is None else tta)
        return combine(probs, self.model_card.combiner), ratios

    def gate_distances(self, gate_stats: np.ndarray) -> np.ndarray:
        return gate_stats.max(axis=1) if gate_stats.size else np.zeros(len(gate_stats))

    def heatmaps(self, images: np.ndarray, target_class: int, method: str = "gradcam") -> np.ndarray:
        """The weighted mean of the members' heat maps (weights: `combine.heatmap_weights`)."""
        weights = heatmap_weights(self.model_card.combiner, len(self.members))
        return np.einsum("m,mnhw->nhw", weights, np.stack([m.heatmaps(images, target_class, method) for m in self.members])).astype(np.float32)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([m.embed(images) for m in self.members], axis=1) / np.sqrt(len(self.members))


def member_probabilities(members: list[Predictor], images: np.ndarray, batch_size: int = 64, tta: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Each member's deployed (calibrated) probabilities, and each member's gate distance / its threshold (N, M)."""
    probs, ratios = [], []
    for member in members:
        raw, stats = member.score(images, batch_size, tta)
        probs.append(member.calibrated(raw))
        ratios.append(member.gate_distances(stats) / member.gate_threshold)
    return probs, np.stack(ratios, axis=1) if len(images) else np.zeros((0, len(members)))


def fit_combiner(method: str, frame: pd.DataFrame, member_probs: list[np.ndarray], classes: list[str]) -> dict[str, object]:
    """Vote weights or the stacking meta-learner, from validation predictions only.

    `frame` holds the rows the predictions are of; any row outside the
    validation part is refused, so no test prediction can reach the fit.
    """
    split = frame["split"].astype(str) if "split" in frame.columns else pd.Series(["unknown"] * len(frame))
    if len(frame) == 0 or (split != "val").any():
        found = sorted(set(split) - {"val"}) or ["none"]
        raise DataError("ensemble", f"the combiner is fitted on validation predictions only; got rows of split(s) {found}")
    if any(len(p) != len(frame) for p in member_probs):
        raise DataError("ensemble", "member predictions and validation rows differ in number")
    labels = np.array([classes.index(str(v)) for v in frame["label"]])
    fitted_on = f"validation part ({len(labels)} images)"
    if method == "soft":
        combiner: dict[str, object] = {"method": "soft", "weights": [1.0] * len(member_probs)}
    elif method == "weighted":
        from scipy.optimize import minimize

        def loss(theta: np.ndarray) -> float:
            w = np.exp(theta - theta.max())
            return log_loss(combine(member_probs, {"method": "weighted", "weights": list(w / w.sum())}), labels)

        theta = minimize(loss, np.zeros(len(member_probs)), method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000}).x
        w = np.exp(theta - theta.max())
        combiner = {"method": "weighted", "weights": [round(float(v), 6) for v in w / w.sum()], "objective": "validation log loss"}
    elif method == "stacking":
        from sklearn.linear_model import LogisticRegression

        if len(np.unique(labels)) < 2:
            raise DataError("ensemble", "stacking needs both classes in the validation part")
        meta = LogisticRegression(C=1.0, max_iter=1000).fit(stacking_features(member_probs), labels)
        combiner = {"method": "stacking", "coef": meta.coef_.round(6).tolist(), "intercept": meta.intercept_.round(6).tolist(),
                    "meta_learner": "logistic regression (L2, C=1) on the members' log-odds"}
    else:
        raise CovidscanError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    combiner["fitted_on"] = fitted_on
    combiner["validation_log_loss"] = round(log_loss(combine(member_probs, combiner), labels), 4)
    return combiner


def _shared_split(frames: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """The members' common manifest; refused (naming the differing images) unless every split is the same."""
    keys = ["path", "slice_index"] if all("slice_index" in f.columns for f in frames) else ["path"]

    def keyed(frame: pd.DataFrame) -> pd.Series:
        return frame.set_index(keys)["split"].astype(str)

    first = keyed(frames[0])
    for frame, name in zip(frames[1:], names[1:]):
        other = keyed(frame)
        joined = pd.concat([first.rename("a"), other.rename("b")], axis=1)
        differing = joined[joined["a"] != joined["b"]]
        if len(differing):
            shown = "; ".join(f"{(i if isinstance(i, str) else i[0])}: {a} in {names[0]}, {b} in {name}"
                              for i, (a, b) in list(differing.iterrows())[:5])
            raise DataError(name, f"members must share one split; {len(differing)} images differ ({shown}"
                                  + (", ..." if len(differing) > 5 else "") + ")")
    return frames[0]


def _member_names(runs: list[Path], cards: list[ModelCard]) -> list[str]:
    names: list[str] = []
    for run, card in zip(runs, cards):
        base = run.name if run.parent.name == "members" else str(card.raw.get("backbone", run.name))
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def build_ensemble(
    runs: list[Path], out: Path, method: str, cfg: EvaluateConfig | None = None, show: bool = True,
    log: Callable[[str], None] = print, externals: dict[str, pd.DataFrame] | None = None,
) -> dict[str, object]:
    """Combine trained runs into the ensemble run folder OUT and evaluate it; returns its metrics."""
    from covidscan.config import load_config, save_config
    from covidscan.data.manifest import image_refs, load_manifest, save_manifest
    from covidscan.evaluate.evaluation import evaluate_run, fit_decision

    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise CovidscanError("an ensemble needs at least two runs")
    cards = [read_model_card(r / MODEL_CARD, f"{r}: not a run folder (no model.json)") for r in runs]
    for run, card in zip(runs, cards):
        if card.kind != NETWORK or "weights" not in card.raw:
            raise CovidscanError(f"{run}: not a trained network's run folder (ensembles of ensembles or bundles are not supported)")
    if len({(c.size, c.preprocess) for c in cards}) > 1 or len({tuple(c.classes) for c in cards}) > 1:
        raise CovidscanError("members must share classes, image size and preprocessing; got "
                             + ", ".join(f"{r}: {c.classes} at {c.size} px, {c.preprocess}" for r, c in zip(runs, cards)))
    names = _member_names(runs, cards)
    frame = _shared_split([load_manifest(r / "manifest.csv") for r in runs], [str(r) for r in runs])
    out.mkdir(parents=True, exist_ok=True)
    for run, name in zip(runs, names):
        target = out / "members" / name
        if run.resolve() != target.resolve():
            for item in MEMBER_FILES:
                if (run / item).is_file():
                    (target / item).parent.mkdir(parents=True, exist_ok=True)
                    atomic.write_bytes(target / item, (run / item).read_bytes())
    config = load_config(runs[0] / "config.yaml")
    config.ensemble.members, config.ensemble.method = ",".join(str(c.raw.get("backbone")) for c in cards), method
    cfg = cfg or config.evaluate
    val = frame[frame["split"] == "val"].reset_index(drop=True)
    members = [Predictor(out / "members" / name) for name in names]
    images = members[0].load_images(image_refs(val), "loading validation images", show)
    member_val, _ = member_probabilities(members, images, tta=cfg.tta)
    combiner = fit_combiner(method, val, member_val, cards[0].classes)
    decision = fit_decision(val, combine(member_val, combiner), cards[0].classes, cfg)
    shares = heatmap_weights(combiner, len(names))
    card = {
        "kind": ENSEMBLE,
        "backbone": f"ensemble ({method}: {' + '.join(str(c.raw.get('backbone')) for c in cards)})",
        "classes": cards[0].classes, "positive_class": cards[0].classes[-1], "image_size": cards[0].size, "in_chans": 1, "threshold": 0.5,
        "preprocess": cards[0].preprocess,
        "members": [{"name": n, "folder": f"members/{n}", "backbone": c.raw.get("backbone"), "pretrained_from": c.raw.get("pretrained_from", ""),
                     "weight": round(float(w), 6), **({"decomposed": c.labels.to_json()} if c.labels.is_decomposed else {})}
                    for n, c, w in zip(names, cards, shares)],
        "combiner": combiner,
        "gate": {"method": GATE_RULE, "threshold": 1.0},
        "pretrained_from": "; ".join(f"{n}: {c.raw.get('pretrained_from', 'unknown')}" for n, c in zip(names, cards)),
        "training_data": cards[0].raw.get("training_data", {}),
        "covidscan_version": __version__, "intended_use": DISCLAIMER,
        **decision,
    }
    atomic.write_json(out / MODEL_CARD, card)
    save_config(config, out / "config.yaml")
    save_manifest(frame, out / "manifest.csv")
    if (runs[0] / "embeddings.npz").is_file() and not (out / "embeddings.npz").is_file():
        atomic.write_bytes(out / "embeddings.npz", (runs[0] / "embeddings.npz").read_bytes())
    for path in sorted((runs[0] / "external").glob("*.csv")) if (runs[0] / "external").is_dir() else []:
        if not (out / "external" / path.name).is_file():
            (out / "external").mkdir(exist_ok=True)
            shutil.copyfile(path, out / "external" / path.name)
    first = json.loads((runs[0] / "metrics.json").read_text()) if (runs[0] / "metrics.json").is_file() else {}
    seconds = {n: _training_seconds(r) for n, r in zip(names, runs)}
    metrics = {
        "covidscan_version": __version__, "decision_support": DISCLAIMER,
        "classes": cards[0].classes, "positive_class": cards[0].classes[-1],
        "split": first.get("split", {}), "data": first.get("data", {}),
        "training": {"ensemble": {"method": method, "members": names, "combiner": combiner,
                                  "member_training_seconds": seconds, "training_seconds": round(sum(seconds.values()), 1)}},
    }
    atomic.write_json(out / "metrics.json", metrics)
    log(f"ensemble ({method}) of {', '.join(names)}: combiner fitted on {combiner['fitted_on']}, validation log loss {combiner['validation_log_loss']}")
    return evaluate_run(out, externals, cfg, show, log)


def _training_seconds(run: Path) -> float:
    """Sum of the member's epoch times (history.jsonl), or its wall time; 0 when unknown."""
    history = run / "history.jsonl"
    if history.is_file():
        return round(sum(float(json.loads(line).get("seconds", 0)) for line in history.read_text().splitlines() if line.strip()), 1)
    return 0.0
