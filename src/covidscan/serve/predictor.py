"""Torch-free inference on an exported bundle: ONNX Runtime, numpy and Pillow only.

One `Bundle` answers for a list of gray images: probabilities (temperature-
scaled), the label at the bundle's threshold, a class activation map from
the exported feature map, and the input gate's verdict. An `EnsembleBundle`
holds one member bundle per network and answers the same way, with each
member's probability beside the combined one. `load_bundle` picks the kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidscan import DISCLAIMER
from covidscan.data.preprocess import prepare_image
from covidscan.atomic import recover_folder
from covidscan.combine import combine, heatmap_weights
from covidscan.decision import apply_temperature, slice_label
from covidscan.errors import CovidscanError
from covidscan.explain.lung_mask import shows_lung
from covidscan.gate import gate_distance, load_gate
from covidscan.model_card import ENSEMBLE, CardFields, ModelCard, read_model_card

BUNDLE_FILES = ("model.json", "model.onnx", "gate.npz")


@dataclass
class SliceResult:
    probabilities: dict[str, float]
    label: str
    in_distribution: bool
    gate_distance: float
    heatmap: np.ndarray | None = None  # (S, S) in [0, 1]
    image: np.ndarray | None = field(default=None, repr=False)  # resized uint8 (S, S)
    members: dict[str, float] | None = None  # an ensemble's members: P(positive) of each
    lung: bool | None = None  # the slice shows lung (the study evidence rule); None: not checked


def is_bundle(folder: Path) -> bool:
    """An exported bundle (a network's or an ensemble's), as opposed to a run folder."""
    card = folder / "model.json"
    return card.is_file() and ((folder / "model.onnx").is_file() or ((folder / "members").is_dir() and not (folder / "config.yaml").is_file()))


def load_bundle(folder: str | Path, threads: int = 0) -> Bundle | EnsembleBundle:
    """The bundle in `folder`: one network, or an ensemble of member bundles."""
    folder = Path(folder)
    recover_folder(folder)  # an export killed mid-swap leaves the previous bundle aside
    card = read_model_card(folder / "model.json", f"{folder}: not a model bundle (no model.json); make one with `covidscan export RUN`")
    return EnsembleBundle(folder, card, threads) if card.kind == ENSEMBLE else Bundle(folder, threads)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class ServedModel(CardFields):
    """What a network bundle and an ensemble bundle share: the card's decision."""

    folder: Path
    model_card: ModelCard

    def _read_card(self, folder: str | Path, card: ModelCard | None) -> None:
        self.folder = Path(folder)
        self.model_card = card or read_model_card(self.folder / "model.json", f"{self.folder}: not a model bundle (no model.json)")

    @property
    def card(self) -> dict[str, object]:
        return self.model_card.raw

    @property
    def version(self) -> str:
        return f"{self.card.get('backbone')}-{self.card.get('covidscan_version')}"

    def describe(self) -> dict[str, object]:
        """What GET /model returns: no weights, no patient data."""
        calibration = self.card.get("calibration") or {}
        assert isinstance(calibration, dict)
        out = {
            "version": self.version,
            "backbone": self.card.get("backbone"),
            "kind": self.model_card.kind,
            "classes": self.classes,
            "positive_class": self.card.get("positive_class"),
            "image_size": self.size,
            "threshold": self.threshold,
            "operating_points": calibration.get("operating_points", {"default": 0.5}),
            "temperature": self.temperature,
            "calibration": calibration.get("reason", "temperature scaling fitted on validation" if self.temperature != 1.0 else "none"),
            "study_rule": self.study_rule,
            "evidence_rule": self.evidence_rule.describe(),
            "validated": self.validated,
            "pretrained_from": self.card.get("pretrained_from"),
            "training_data": self.card.get("training_data", {}),
            "intended_use": DISCLAIMER,
        }
        if self.model_card.labels.is_decomposed:
            out["sub_classes"] = list(self.model_card.labels.outputs)
        if self.model_card.members:
            out["members"] = [m.to_json() for m in self.model_card.members]
            out["combiner"] = self.model_card.combiner.get("method")
        return out

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Gray float image in [0, 1] of any size -> the model's uint8 input (size x size), as in training."""
        return prepare_image(pixels, self.size, self.model_card.preprocess)

    def _prepared(self, images: list[np.ndarray]) -> np.ndarray:
        prepared = [img if img.dtype == np.uint8 and img.shape == (self.size, self.size) else self.prepare(img) for img in images]
        return np.stack(prepared) if prepared else np.zeros((0, self.size, self.size), np.uint8)


class Bundle(ServedModel):
    """An exported network: model.onnx + model.json + gate.npz."""

    def __init__(self, folder: str | Path, threads: int = 0, card: ModelCard | None = None, spinning: bool = True) -> None:
        """`spinning=False`: ONNX Runtime's threads sleep between runs instead of spinning (ensemble members take turns)."""
        import onnxruntime as ort

        folder = Path(folder)
        recover_folder(folder)  # an export killed mid-swap leaves the previous bundle aside
        missing = [name for name in BUNDLE_FILES if not (folder / name).is_file()]
        if missing:
            raise CovidscanError(f"{folder}: not a model bundle (missing {', '.join(missing)}); make one with `covidscan export RUN`")
        self._read_card(folder, card)
        cam = self.card["cam"]
        assert isinstance(cam, dict)
        self.cam_weights = np.asarray(cam["weights"], np.float32)  # (outputs, channels)
        self.cam_bias = np.asarray(cam.get("bias") or np.zeros(len(self.cam_weights)), np.float32)
        self.parents = np.asarray(self.model_card.labels.parents)
        self.gate_reference = load_gate(self.folder / "gate.npz")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 1, S, S) float32 in [0, 1] -> (probabilities (N, C), feature maps (N, C', h, w), gate statistics (N, D))."""
        logits, features, gate_features = self.session.run(None, {"images": batch})
        probs = _softmax(logits)
        if self.tta:  # the model card says probabilities are averaged with the left-right mirror's (as evaluated)
            probs = (probs + _softmax(self.session.run(["logits"], {"images": np.ascontiguousarray(batch[..., ::-1])})[0])) / 2
        return apply_temperature(probs, self.temperature), features, gate_features  # as the PyTorch predictor calibrates

    def cam_class_weights(self, features: np.ndarray, target: int) -> np.ndarray:
        """Per-image CAM weights (N, channels) of a class: its head row, or, for decomposed classes,
        the sub-classes' rows weighted by their share of the class (the gradient of the composed logit)."""
        rows = np.flatnonzero(self.parents == target)
        if len(rows) == 1:
            return np.broadcast_to(self.cam_weights[rows[0]], (len(features), self.cam_weights.shape[1]))
        sub = features.mean(axis=(2, 3)) @ self.cam_weights[rows].T + self.cam_bias[rows]
        share = np.exp(sub - sub.max(axis=1, keepdims=True))
        share /= share.sum(axis=1, keepdims=True)
        return share @ self.cam_weights[rows]

    def cam(self, features: np.ndarray, target: int) -> np.ndarray:
        """ReLU(sum_c w_c F_c), min-max scaled per image, upsampled to the input size."""
        from covidscan.explain.overlay import resize_heat

        maps = np.maximum(np.einsum("nc,nchw->nhw", self.cam_class_weights(features, target), features), 0.0)
        out = []
        for m in maps:
            m = m - m.min()
            m = m / (m.max() + 1e-7)
            out.append(resize_heat(m, self.size, self.size))
        return np.stack(out) if out else np.zeros((0, self.size, self.size), np.float32)

    def gate(self, gate_features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each image's intermediate feature statistics from the training images'."""
        return gate_distance(self.gate_reference, gate_features)

    def warm_up(self, batch_size: int = 32) -> None:
        """Run one full batch, so ONNX Runtime's memory arena has its working size before the first request."""
        self.run(np.zeros((batch_size, 1, self.size, self.size), np.float32))

    def analyse(self, images: list[np.ndarray], heatmaps: bool = True, batch_size: int = 32, heatmap_top: int = 0,
                lung: bool = True) -> list[SliceResult]:
        """Gray float images in [0, 1] of any size (or already prepared uint8 inputs) -> one result per image.

        heatmap_top > 0: heat maps only for that many slices, the most suspicious
        (the rest would be computed and thrown away; a 1000-slice volume would
        hold 1000 maps). `lung`: check each slice for lung (an ensemble checks once, not per member).
        """
        resized = self._prepared(images)
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
                results.append(SliceResult(
                    probabilities={c: float(v) for c, v in zip(self.classes, p)}, label=slice_label(p, self.classes, self.threshold),
                    in_distribution=bool(d <= self.gate_threshold), gate_distance=float(d), heatmap=heat, image=image,
                    lung=shows_lung(image) if lung else None,
                ))
        if kept:
            for (_, index, _), heat in zip(kept, self.cam(np.stack([f for _, _, f in kept]), positive)):
                results[index].heatmap = heat
        return results



class EnsembleBundle(ServedModel):
    """An exported ensemble: model.json (members, combiner, decision) + members/<name>/ network bundles."""

    def __init__(self, folder: str | Path, card: ModelCard | None = None, threads: int = 0) -> None:
        self._read_card(folder, card)
        self.members = [Bundle(self.folder / m.folder, threads, spinning=False) for m in self.model_card.members]
        self.names = [m.name for m in self.model_card.members]
        self.heat_weights = heatmap_weights(self.model_card.combiner, len(self.members))
        for member, name in zip(self.members, self.names):
            if member.size != self.size or member.classes != self.classes:
                raise CovidscanError(f"{self.folder}: member {name} has classes {member.classes} at {member.size} px; the ensemble {self.classes} at {self.size} px")

    def warm_up(self, batch_size: int = 32) -> None:
        for member in self.members:
            member.warm_up(batch_size)

    def analyse(self, images: list[np.ndarray], heatmaps: bool = True, batch_size: int = 32, heatmap_top: int = 0) -> list[SliceResult]:
        """As `Bundle.analyse`: the members' deployed probabilities combined, every member's gate, the weighted mean heat map."""
        resized = list(self._prepared(images))
        every_map = heatmaps and not heatmap_top  # all maps wanted: the members draw them in this one pass
        per_member = [member.analyse(resized, heatmaps=every_map, batch_size=batch_size, lung=False) for member in self.members]
        positive = len(self.classes) - 1
        member_probs = [np.array([[r.probabilities[c] for c in self.classes] for r in results], np.float32).reshape(-1, len(self.classes))
                        for results in per_member]
        probs = apply_temperature(combine(member_probs, self.model_card.combiner), self.temperature) if resized else np.zeros((0, len(self.classes)))
        ratios = np.array([[r.gate_distance / m.gate_threshold for r in results] for m, results in zip(self.members, per_member)]).reshape(len(self.members), -1)
        distance = ratios.max(axis=0) if resized else np.zeros(0)
        results = [
            SliceResult(probabilities={c: float(v) for c, v in zip(self.classes, p)}, label=slice_label(p, self.classes, self.threshold),
                        in_distribution=bool(d <= self.gate_threshold), gate_distance=float(d), image=image,
                        members={name: float(mp[i, positive]) for name, mp in zip(self.names, member_probs)}, lung=shows_lung(image))
            for i, (image, p, d) in enumerate(zip(resized, probs, distance))
        ]
        if heatmaps and results:
            if every_map:
                chosen, member_maps = np.arange(len(results)), per_member
            else:  # only the most suspicious slices by the ensemble's probability: the members draw just those
                chosen = np.argsort(-probs[:, positive], kind="stable")[:heatmap_top]
                member_maps = [member.analyse([resized[i] for i in chosen], heatmaps=True, batch_size=batch_size, lung=False) for member in self.members]
            for j, i in enumerate(chosen):
                maps = np.stack([m[j].heatmap for m in member_maps])  # type: ignore[misc]
                results[int(i)].heatmap = np.einsum("m,mhw->hw", self.heat_weights, maps).astype(np.float32)
        return results
