"""Load a trained run and predict class probabilities for image files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidscan import DISCLAIMER
from covidscan.data.io import load_resized
from covidscan.data.transforms import Normaliser, to_float
from covidscan.errors import CovidscanError
from covidscan.model_card import read_model_card
from covidscan.models.classifier import CovidClassifier
from covidscan.train.checkpoint import load_checkpoint


@dataclass
class Prediction:
    path: str
    label: str
    probabilities: dict[str, float]
    threshold: float
    note: str = DISCLAIMER


class Predictor:
    """A trained model with its preprocessing, from a run folder (or its model.json)."""

    def __init__(self, model_path: str | Path) -> None:
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

    @torch.no_grad()
    def probabilities(self, paths: list[str | Path]) -> np.ndarray:
        """Class probabilities, temperature-scaled when the run was calibrated on validation data."""
        images = np.stack([load_resized(p, self.size)[None] for p in paths])
        batch = self.normaliser(to_float(torch.from_numpy(images)))
        return (self.model(batch) / self.temperature).softmax(1).numpy()

    def predict(self, paths: list[str | Path]) -> list[Prediction]:
        probs = self.probabilities(paths)
        out = []
        for path, p in zip(paths, probs):
            if len(self.classes) == 2:
                label = self.classes[1] if p[1] >= self.threshold else self.classes[0]
            else:
                label = self.classes[int(p.argmax())]
            out.append(Prediction(str(path), label, {c: float(v) for c, v in zip(self.classes, p)}, self.threshold))
        return out
