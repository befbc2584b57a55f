"""A trained run as it is deployed: model, calibration, input gate and study rule.

The same decision the service makes from an exported bundle, computed with
PyTorch from the run folder: evaluation and `covidscan predict` use it, so
the report describes what the service answers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidscan import DISCLAIMER
from covidscan.data.io import load_resized
from covidscan.data.transforms import Normaliser
from covidscan.decision import DEFAULT_STUDY_RULE, REFUSED, apply_temperature, study_answer
from covidscan.errors import CovidscanError
from covidscan.gate import gate_distance, load_gate
from covidscan.model_card import read_model_card
from covidscan.models.classifier import CovidClassifier
from covidscan.train.checkpoint import load_checkpoint

@dataclass
class Prediction:
    path: str
    label: str  # REFUSED when the input gate finds the image unlike the training images
    probabilities: dict[str, float]
    threshold: float
    in_distribution: bool = True
    gate_distance: float = 0.0
    note: str = DISCLAIMER


class Predictor:
    """A trained model with its preprocessing, calibration and gate, from a run folder (or its model.json)."""

    def __init__(self, model_path: str | Path) -> None:
        from covidscan.export.onnx import ExportWrapper

        model_path = Path(model_path)
        card_path = model_path / "model.json" if model_path.is_dir() else model_path
        card = read_model_card(card_path, f"{model_path}: not a run folder (no model.json); train one with `covidscan train` or `make demo`")
        self.folder = card_path.parent
        self.card = card.raw
        if "weights" not in self.card or "normalise" not in self.card:
            hint = "; `covidscan predict` reads bundles too" if (self.folder / "model.onnx").is_file() else ""
            raise CovidscanError(f"{self.folder}: not a training run's model card (no weights){hint}")
        self.classes, self.size, self.threshold, self.temperature = card.classes, card.size, card.threshold, card.temperature
        self.normaliser = Normaliser(**self.card["normalise"])
        self.model = CovidClassifier(
            self.card["backbone"], len(self.classes), int(self.card["in_chans"]), float(self.card["dropout"]), weights="none"
        )
        load_checkpoint(self.folder / self.card["weights"], self.model)
        self.model.eval()
        self.wrapper = ExportWrapper(self.model, self.normaliser.mean, self.normaliser.std).eval()
        self.tta = bool(self.card.get("tta", False))
        gate = self.card.get("gate")
        self.gate = load_gate(self.folder / "gate.npz") if isinstance(gate, dict) and (self.folder / "gate.npz").is_file() else None
        self.gate_threshold = float(gate["threshold"]) if self.gate is not None and isinstance(gate, dict) else math.inf
        self.study_rule: dict[str, object] = self.card.get("study_rule") or DEFAULT_STUDY_RULE  # type: ignore[assignment]

    @torch.no_grad()
    def score(self, images: np.ndarray, batch_size: int = 64, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, 1, S, S) -> (uncalibrated probabilities (N, C), gate statistics (N, D)).

        `tta` (default: the model card's): probabilities averaged with the left-right mirror's.
        """
        tta = self.tta if tta is None else tta
        probs, stats = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).float().div_(255.0)
            logits, _, gate_stats = self.wrapper(batch)
            p = logits.softmax(1)
            if tta:
                p = (p + self.wrapper(batch.flip(-1))[0].softmax(1)) / 2
            probs.append(p.numpy())
            stats.append(gate_stats.numpy())
        if not probs:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs), np.concatenate(stats)

    def gate_distances(self, gate_stats: np.ndarray) -> np.ndarray:
        """Distance from the training images; zeros for a run trained before the gate existed."""
        return gate_distance(self.gate, gate_stats) if self.gate is not None else np.zeros(len(gate_stats))

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self.temperature)

    def probabilities(self, paths: list[str | Path]) -> np.ndarray:
        """Class probabilities, temperature-scaled when calibration was kept on validation data."""
        images = np.stack([load_resized(p, self.size)[None] for p in paths])
        return self.calibrated(self.score(images)[0])

    def predict(self, paths: list[str | Path]) -> list[Prediction]:
        """One prediction per image; images the gate refuses get the label 'refused'."""
        images = np.stack([load_resized(p, self.size)[None] for p in paths])
        raw, stats = self.score(images)
        probs, distances = self.calibrated(raw), self.gate_distances(stats)
        out = []
        for path, p, d in zip(paths, probs, distances):
            accepted = bool(d <= self.gate_threshold)
            if not accepted:
                label = REFUSED
            elif len(self.classes) == 2:
                label = self.classes[1] if p[1] >= self.threshold else self.classes[0]
            else:
                label = self.classes[int(p.argmax())]
            out.append(Prediction(str(path), label, {c: float(v) for c, v in zip(self.classes, p)}, self.threshold, accepted, float(d)))
        return out

    def study(self, predictions: list[Prediction]) -> tuple[str, float, int]:
        """(label, probability, slices used) of images taken as one study, by the model card's study rule."""
        return study_answer([p.probabilities[self.classes[-1]] for p in predictions if p.in_distribution], self.classes, self.study_rule)
