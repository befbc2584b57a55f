"""Export a trained run to an ONNX bundle that the torch-free service serves.

The graph takes gray images in [0, 1] (N, 1, S, S), normalises them itself,
and returns the logits and the last feature map. With covidscan's
GAP-dropout-linear head, ReLU(sum_c w_c F_c) over that feature map is exactly
Grad-CAM, so the service draws heat maps without autograd. Parity with
PyTorch is measured at export time and written into the bundle.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidscan import DISCLAIMER, __version__, atomic
from covidscan.errors import CovidscanError
from covidscan.models.classifier import CovidClassifier

BUNDLE_FORMAT = "covidscan-onnx-bundle/1"
OPSET = 18


class ExportWrapper(nn.Module):
    """[0, 1] gray input -> (logits, feature map); normalisation inside the graph."""

    def __init__(self, model: CovidClassifier, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features((images - self.mean) / self.std)
        return self.model.forward_head(features), features


def _export_graph(wrapper: ExportWrapper, size: int, path: Path) -> None:
    example = torch.rand(2, 1, size, size)
    with atomic.atomic_path(path) as tmp:
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=["images"], output_names=["logits", "features"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )


def parity(wrapper: ExportWrapper, onnx_path: Path, inputs: np.ndarray) -> dict[str, float]:
    """Max abs difference between PyTorch and ONNX Runtime on the same inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, features = session.run(None, {"images": inputs.astype(np.float32)})
    with torch.no_grad():
        ref_logits, ref_features = wrapper(torch.from_numpy(inputs.astype(np.float32)))
    ref_probs, probs = ref_logits.softmax(1).numpy(), torch.from_numpy(logits).softmax(1).numpy()
    return {
        "images": int(len(inputs)),
        "max_abs_logit_diff": float(np.abs(logits - ref_logits.numpy()).max()),
        "max_abs_probability_diff": float(np.abs(probs - ref_probs).max()),
        "max_abs_feature_diff": float(np.abs(features - ref_features.numpy()).max()),
    }


def gate_reference(model: CovidClassifier, wrapper: ExportWrapper, train: np.ndarray, val: np.ndarray, quantile: float = 0.005) -> dict[str, object]:
    """The input gate: nearest-neighbour cosine similarity of an image's embedding to training images.

    The refusal threshold is a low quantile of the similarity of *validation*
    images (unseen patients of the same kind) to the training reference, so
    real scans pass and photographs, documents or other body parts do not.
    """
    def embed(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), 64):
                _, features = wrapper(torch.from_numpy(images[start : start + 64]))
                out.append(nn.functional.normalize(features.mean(dim=(2, 3)), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)

    reference, held_out = embed(train), embed(val)
    similarity = (held_out @ reference.T).max(axis=1)
    threshold = float(np.quantile(similarity, quantile)) - 0.02  # a small margin below the lowest real images
    return {"reference": reference.astype(np.float16), "threshold": threshold, "val_similarity": similarity}


def export_run(run_dir: str | Path, out_dir: str | Path, gate_images: int = 1024) -> dict[str, object]:
    """Write OUT/model.onnx, OUT/model.json and OUT/gate.npz; return the bundle card."""
    from covidscan.data.manifest import image_refs, load_manifest
    from covidscan.pipeline import load_image_array
    from covidscan.predict import Predictor

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    predictor = Predictor(run_dir)
    model = predictor.model.eval()
    wrapper = ExportWrapper(model, predictor.normaliser.mean, predictor.normaliser.std).eval()
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _export_graph(wrapper, predictor.size, staging / "model.onnx")

    frame = load_manifest(run_dir / "manifest.csv")
    rng = np.random.default_rng(0)

    def images_of(split: str, limit: int) -> np.ndarray:
        rows = frame[frame["split"] == split]
        rows = rows.iloc[np.sort(rng.choice(len(rows), min(limit, len(rows)), replace=False))]
        return load_image_array(image_refs(rows), predictor.size, f"loading {split} images", False).astype(np.float32) / 255.0

    real = images_of("test", 16)
    random_inputs = np.random.default_rng(1).random((4, 1, predictor.size, predictor.size), dtype=np.float32)
    checks = {"random": parity(wrapper, staging / "model.onnx", random_inputs), "real": parity(wrapper, staging / "model.onnx", real)}
    worst = max(c["max_abs_probability_diff"] for c in checks.values())
    if worst > 1e-3:
        raise CovidscanError(f"{run_dir}: ONNX export disagrees with PyTorch (max probability difference {worst:.2e})")
    gate = gate_reference(model, wrapper, images_of("train", gate_images), images_of("val", gate_images))
    np.savez_compressed(staging / "gate.npz", reference=gate["reference"])
    card = dict(predictor.card)
    card.update({
        "format": BUNDLE_FORMAT,
        "onnx": "model.onnx",
        "inputs": {"name": "images", "shape": ["batch", 1, predictor.size, predictor.size], "range": [0.0, 1.0],
                   "preprocessing": "grayscale, bilinear resize to size x size (no crop), scaled to [0, 1]; normalisation is inside the graph"},
        "outputs": {"logits": "class scores (softmax(logits / temperature) = probabilities)", "features": "last feature map (CAM layer)"},
        "cam": {"weights": model.head.weight.detach().numpy().round(7).tolist(), "method": "CAM = Grad-CAM for the GAP-linear head"},
        "gate": {"file": "gate.npz", "threshold": gate["threshold"], "reference_images": int(len(gate["reference"])),
                 "validation_min_similarity": float(np.min(gate["val_similarity"])) if len(gate["val_similarity"]) else None},
        "parity": checks,
        "exported_with": f"covidscan {__version__}, torch {torch.__version__}",
        "intended_use": DISCLAIMER,
    })
    card.pop("weights", None)
    atomic.write_text(staging / "model.json", json.dumps(card, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return card
