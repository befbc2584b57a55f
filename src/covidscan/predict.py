"""A trained run as it is deployed: the scorer behind evaluation, `predict`, `compare` and export.

A scorer turns uint8 images into class probabilities and gate statistics; a
single network (`Predictor`), a DeTraC-decomposed one (the same class: its
label space composes sub-classes) and an ensemble (`covidscan.ensemble`) all
implement it. `DeployedScorer` adds what the service does from a bundle:
calibration, input gate, label and study rule from the model card, so the
report describes what the service answers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidscan import DISCLAIMER
from covidscan.data.io import load_image_array
from covidscan.data.transforms import Normaliser
from covidscan.decision import REFUSED, apply_temperature, slice_label
from covidscan.explain.lung_mask import shows_lung
from covidscan.errors import CovidscanError
from covidscan.gate import gate_distance, load_gate
from covidscan.model_card import ENSEMBLE, CardFields, ModelCard, read_model_card
from covidscan.models.classifier import CovidClassifier
from covidscan.train.checkpoint import load_checkpoint

MODEL_CARD = "model.json"


@dataclass
class Prediction:
    path: str
    label: str  # REFUSED when the input gate finds the image unlike the training images
    probabilities: dict[str, float]
    threshold: float
    in_distribution: bool = True
    gate_distance: float = 0.0
    note: str = DISCLAIMER
    lung: bool | None = None  # the slice shows lung (the study evidence rule)


class DeployedScorer(CardFields, ABC):
    """The interface every model implements, and the deployed decision on top of it."""

    model_card: ModelCard
    folder: Path

    @abstractmethod
    def score(self, images: np.ndarray, batch_size: int = 64, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, 1, S, S) -> (uncalibrated class probabilities (N, C), gate statistics (N, D))."""

    @abstractmethod
    def gate_distances(self, gate_stats: np.ndarray) -> np.ndarray:
        """Distance from the training images, comparable with `gate_threshold`."""

    @abstractmethod
    def heatmaps(self, images: np.ndarray, target_class: int, method: str = "gradcam") -> np.ndarray:
        """Heat maps (N, S, S) in [0, 1] explaining `target_class` for uint8 images."""

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised features (N, D), for t-SNE."""

    @property
    @abstractmethod
    def has_gate(self) -> bool:
        """False for a run trained before the input gate existed."""

    @property
    def card(self) -> dict[str, object]:
        """model.json as a dict (descriptive fields included)."""
        return self.model_card.to_json()

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self.model_card.temperature)

    def probabilities(self, paths: list[str | Path]) -> np.ndarray:
        """Class probabilities, temperature-scaled when calibration was kept on validation data."""
        return self.calibrated(self.score(self._read(paths))[0])

    def load_images(self, refs: list[tuple[str, int | None]], description: str = "loading images", show: bool = False) -> np.ndarray:
        """uint8 (N, 1, S, S) inputs of (path, slice) references, prepared as the model card says (size, preprocessing)."""
        return load_image_array(refs, self.size, description, show, self.model_card.preprocess)

    def _read(self, paths: list[str | Path]) -> np.ndarray:
        return self.load_images([(str(p), None) for p in paths])

    def predict(self, paths: list[str | Path]) -> list[Prediction]:
        """One prediction per image; images the gate refuses get the label 'refused'."""
        return self.predict_images([str(p) for p in paths], self._read(paths))

    def predict_pixels(self, names: list[str], pixels: list[np.ndarray]) -> list[Prediction]:
        """`predict` on decoded gray images in [0, 1] (the slices of a study), prepared as the model card says."""
        from covidscan.data.preprocess import prepare_image

        images = np.stack([prepare_image(p, self.size, self.model_card.preprocess) for p in pixels])[:, None] if pixels else \
            np.zeros((0, 1, self.size, self.size), np.uint8)
        return self.predict_images(names, images)

    def predict_images(self, names: list[str], images: np.ndarray) -> list[Prediction]:
        """Predictions for prepared uint8 inputs (N, 1, S, S) named `names`."""
        raw, stats = self.score(images)
        probs, distances = self.calibrated(raw), self.gate_distances(stats)
        out = []
        for path, p, d, image in zip(names, probs, distances, images):
            accepted = bool(d <= self.gate_threshold)
            label = slice_label(p, self.classes, self.threshold) if accepted else REFUSED
            out.append(Prediction(str(path), label, {c: float(v) for c, v in zip(self.classes, p)}, self.threshold, accepted, float(d),
                                  lung=shows_lung(image)))
        return out


class Predictor(DeployedScorer):
    """One network (decomposed or not) with its preprocessing, calibration and gate, from a run folder."""

    def __init__(self, model_path: str | Path, card: ModelCard | None = None) -> None:
        """`card`: the card in memory (training hands it over before model.json is final); else read from disk."""
        from covidscan.export.onnx import ExportWrapper

        model_path = Path(model_path)
        card_path = model_path / MODEL_CARD if model_path.is_dir() else model_path
        if card is None:
            card = read_model_card(card_path, f"{model_path}: not a run folder (no model.json); train one with `covidscan train` or `make demo`")
        self.folder = card_path.parent
        self.model_card = card
        raw = card.raw
        if "weights" not in raw or "normalise" not in raw:
            hint = "; `covidscan predict` reads bundles too" if (self.folder / "model.onnx").is_file() else ""
            raise CovidscanError(f"{self.folder}: not a training run's model card (no weights){hint}")
        self.normaliser = Normaliser(**raw["normalise"])  # type: ignore[arg-type]
        self.model = CovidClassifier(
            str(raw["backbone"]), len(card.labels.outputs), int(raw["in_chans"]), float(raw["dropout"]),  # type: ignore[arg-type]
            weights="none", parents=card.labels.parents,
        )
        load_checkpoint(self.folder / str(raw["weights"]), self.model)
        self.model.eval()
        self.wrapper = ExportWrapper(self.model, self.normaliser.mean, self.normaliser.std).eval()
        self.gate = load_gate(self.folder / "gate.npz") if isinstance(raw.get("gate"), dict) and (self.folder / "gate.npz").is_file() else None

    @property
    def has_gate(self) -> bool:
        return self.gate is not None

    @torch.no_grad()
    def score(self, images: np.ndarray, batch_size: int = 64, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`tta` (default: the model card's): probabilities averaged with the left-right mirror's."""
        tta = self.model_card.tta if tta is None else tta
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
        return gate_distance(self.gate, gate_stats) if self.gate is not None else np.zeros(len(gate_stats))

    def heatmaps(self, images: np.ndarray, target_class: int, method: str = "gradcam") -> np.ndarray:
        from covidscan.explain.cam import heatmaps

        return heatmaps(self.model, images, self.normaliser, target_class=target_class, method=method)

    def embed(self, images: np.ndarray) -> np.ndarray:
        from covidscan.models.embed import embed_array

        return embed_array(self.model, images, self.normaliser, show=False)


def load_scorer(model_path: str | Path, card: ModelCard | None = None) -> DeployedScorer:
    """The scorer of a run folder (or its model.json): a network or an ensemble, as its card says."""
    model_path = Path(model_path)
    card_path = model_path / MODEL_CARD if model_path.is_dir() else model_path
    if card is None:
        card = read_model_card(card_path, f"{model_path}: not a run folder (no model.json); train one with `covidscan train` or `make demo`")
    if card.kind == ENSEMBLE:
        from covidscan.ensemble import EnsemblePredictor

        return EnsemblePredictor(card_path.parent, card)
    return Predictor(card_path, card)
