"""Torch-free inference on an exported bundle: ONNX Runtime, numpy and Pillow only.

One `Bundle` answers for a list of gray images: probabilities (temperature-
scaled), the label at the bundle's threshold, a class activation map from
the exported feature map, and the input gate's verdict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidscan import DISCLAIMER
from covidscan.data.io import resize_gray
from covidscan.atomic import recover_folder
from covidscan.decision import DEFAULT_STUDY_RULE, apply_temperature, study_answer
from covidscan.errors import CovidscanError
from covidscan.gate import gate_distance, load_gate
from covidscan.model_card import read_model_card

BUNDLE_FILES = ("model.json", "model.onnx", "gate.npz")


@dataclass
class SliceResult:
    probabilities: dict[str, float]
    label: str
    in_distribution: bool
    gate_distance: float
    heatmap: np.ndarray | None = None  # (S, S) in [0, 1]
    image: np.ndarray | None = field(default=None, repr=False)  # resized uint8 (S, S)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Bundle:
    """An exported model folder: model.onnx + model.json + gate.npz."""

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        recover_folder(self.folder)  # an export killed mid-swap leaves the previous bundle aside
        missing = [name for name in BUNDLE_FILES if not (self.folder / name).is_file()]
        if missing:
            raise CovidscanError(f"{self.folder}: not a model bundle (missing {', '.join(missing)}); make one with `covidscan export RUN`")
        card = read_model_card(self.folder / "model.json", f"{self.folder}: not a model bundle (no model.json)")
        self.card = card.raw
        self.classes, self.size, self.threshold, self.temperature = card.classes, card.size, card.threshold, card.temperature
        self.cam_weights = np.asarray(self.card["cam"]["weights"], np.float32)  # (classes, channels)
        self.gate_threshold = float(self.card["gate"]["threshold"])
        self.gate_reference = load_gate(self.folder / "gate.npz")
        self.study_rule: dict[str, object] = self.card.get("study_rule") or DEFAULT_STUDY_RULE  # type: ignore[assignment]
        self.tta = bool(self.card.get("tta", False))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

    @property
    def version(self) -> str:
        return f"{self.card.get('backbone')}-{self.card.get('covidscan_version')}"

    def describe(self) -> dict[str, object]:
        """What GET /model returns: no weights, no patient data."""
        calibration = self.card.get("calibration") or {}
        return {
            "version": self.version,
            "backbone": self.card.get("backbone"),
            "classes": self.classes,
            "positive_class": self.card.get("positive_class"),
            "image_size": self.size,
            "threshold": self.threshold,
            "operating_points": calibration.get("operating_points", {"default": 0.5}),
            "temperature": self.temperature,
            "calibration": calibration.get("reason", "temperature scaling fitted on validation" if self.temperature != 1.0 else "none"),
            "study_rule": self.study_rule,
            "training_data": self.card.get("training_data", {}),
            "intended_use": DISCLAIMER,
        }

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 1, S, S) float32 in [0, 1] -> (probabilities (N, C), feature maps (N, C', h, w), gate statistics (N, D))."""
        logits, features, gate_features = self.session.run(None, {"images": batch})
        probs = _softmax(logits)
        if self.tta:  # the model card says probabilities are averaged with the left-right mirror's (as evaluated)
            probs = (probs + _softmax(self.session.run(["logits"], {"images": np.ascontiguousarray(batch[..., ::-1])})[0])) / 2
        return apply_temperature(probs, self.temperature), features, gate_features  # as the PyTorch predictor calibrates

    def cam(self, features: np.ndarray, target: int) -> np.ndarray:
        """ReLU(sum_c w_c F_c), min-max scaled per image, upsampled to the input size."""
        from covidscan.explain.overlay import resize_heat

        maps = np.maximum(np.einsum("c,nchw->nhw", self.cam_weights[target], features), 0.0)
        out = []
        for m in maps:
            m = m - m.min()
            m = m / (m.max() + 1e-7)
            out.append(resize_heat(m, self.size, self.size))
        return np.stack(out) if out else np.zeros((0, self.size, self.size), np.float32)

    def gate(self, gate_features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each image's intermediate feature statistics from the training images'."""
        return gate_distance(self.gate_reference, gate_features)

    def study(self, results: list[SliceResult]) -> tuple[str, float, int]:
        """(label, probability, slices used) of slices taken as one study: the model card's rule over accepted slices."""
        return study_answer([r.probabilities[self.classes[-1]] for r in results if r.in_distribution], self.classes, self.study_rule)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Gray float image in [0, 1] of any size -> the model's uint8 input (size x size), as in training."""
        return resize_gray(np.asarray(pixels, np.float32), self.size)

    def warm_up(self, batch_size: int = 32) -> None:
        """Run one full batch, so ONNX Runtime's memory arena has its working size before the first request."""
        self.run(np.zeros((batch_size, 1, self.size, self.size), np.float32))

    def analyse(self, images: list[np.ndarray], heatmaps: bool = True, batch_size: int = 32, heatmap_top: int = 0) -> list[SliceResult]:
        """Gray float images in [0, 1] of any size (or already prepared uint8 inputs) -> one result per image.

        heatmap_top > 0: heat maps only for that many slices, the most suspicious
        (the rest would be computed and thrown away; a 1000-slice volume would
        hold 1000 maps).
        """
        prepared = [img if img.dtype == np.uint8 and img.shape == (self.size, self.size) else self.prepare(img) for img in images]
        resized = np.stack(prepared) if prepared else np.zeros((0, self.size, self.size), np.uint8)
        results: list[SliceResult] = []
        positive = len(self.classes) - 1
        kept: list[tuple[float, int, np.ndarray]] = []  # (P(positive), index, feature map) of the top slices so far
        for start in range(0, len(resized), batch_size):
            chunk = resized[start : start + batch_size]
            probs, features, gate_features = self.run((chunk[:, None].astype(np.float32) / 255.0))
            distance = self.gate(gate_features)
            if heatmaps and heatmap_top:
                kept = sorted(kept + [(float(p[positive]), start + i, f) for i, (p, f) in enumerate(zip(probs, features))],
                              key=lambda item: (-item[0], item[1]))[:heatmap_top]
            maps = self.cam(features, positive) if heatmaps and not heatmap_top else [None] * len(chunk)
            for image, p, d, heat in zip(chunk, probs, distance, maps):
                if len(self.classes) == 2:
                    label = self.classes[1] if p[1] >= self.threshold else self.classes[0]
                else:
                    label = self.classes[int(p.argmax())]
                results.append(SliceResult(
                    probabilities={c: float(v) for c, v in zip(self.classes, p)}, label=label,
                    in_distribution=bool(d <= self.gate_threshold), gate_distance=float(d), heatmap=heat, image=image,
                ))
        if kept:
            for (_, index, _), heat in zip(kept, self.cam(np.stack([f for _, _, f in kept]), positive)):
                results[index].heatmap = heat
        return results

