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
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from covidscan import DISCLAIMER, __version__, atomic
from covidscan.errors import CovidscanError
from covidscan.gate import GATE_ARRAYS, GATE_METHOD, GATE_QUANTILE, gate_distance, gate_reference, save_gate
from covidscan.models.classifier import CovidClassifier, _get_module

if TYPE_CHECKING:
    from covidscan.ensemble import EnsemblePredictor

BUNDLE_FORMAT = "covidscan-onnx-bundle/1"
OPSET = 18


class ExportWrapper(nn.Module):
    """[0, 1] gray input -> (logits, feature map, gate statistics); normalisation inside the graph.

    Gate statistics: per-channel mean and standard deviation of the second-deepest
    feature stage, log-compressed; the service's input gate measures how far they
    lie from the training images'.
    """

    def __init__(self, model: CovidClassifier, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std
        name = model.gate_layer_name()
        self.gate_module = _get_module(model.backbone, name) if name else model.feature_map
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        # Hooked for this call only: the model stays hook-free for anyone using it after the export.
        handle = self.gate_module.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            features = self.model.forward_features((images - self.mean) / self.std)
        finally:
            handle.remove()
        middle = captured[-1].float()
        stats = torch.cat([middle.mean(dim=(2, 3)), middle.flatten(2).std(dim=2)], dim=1)
        return self.model.forward_head(features), features, torch.log1p(stats.abs())


def _export_graph(wrapper: ExportWrapper, size: int, path: Path) -> None:
    example = torch.rand(2, 1, size, size)
    with atomic.atomic_path(path) as tmp:
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=["images"], output_names=["logits", "features", "gate_features"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}, "gate_features": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )


def parity(wrapper: ExportWrapper, onnx_path: Path, inputs: np.ndarray) -> dict[str, float]:
    """Max abs difference between PyTorch and ONNX Runtime on the same inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, features, _ = session.run(None, {"images": inputs.astype(np.float32)})
    with torch.no_grad():
        ref_logits, ref_features, _ = wrapper(torch.from_numpy(inputs.astype(np.float32)))
    ref_probs, probs = ref_logits.softmax(1).numpy(), torch.from_numpy(logits).softmax(1).numpy()
    return {
        "images": int(len(inputs)),
        "max_abs_logit_diff": float(np.abs(logits - ref_logits.numpy()).max()),
        "max_abs_probability_diff": float(np.abs(probs - ref_probs).max()),
        "max_abs_feature_diff": float(np.abs(features - ref_features.numpy()).max()),
    }


def export_model(
    model: CovidClassifier,
    mean: float,
    std: float,
    size: int,
    card: dict[str, object],
    out_dir: str | Path,
    real_images: np.ndarray,
    gate_train: np.ndarray,
    gate_val: np.ndarray,
    int8: bool = False,
    check_labels: np.ndarray | None = None,
    run_gate: dict[str, np.ndarray] | None = None,
) -> dict[str, object]:
    """Write OUT/model.onnx, model.json and gate.npz for a model; images are float32 (N, 1, S, S) in [0, 1].

    Written into a staging folder and swapped in, so a failed export never
    leaves half a bundle. Refuses when ONNX Runtime disagrees with PyTorch.
    `int8`: serve a statically quantised graph instead, if its decisions on
    `real_images` (labels `check_labels` for the AUC) stay those of fp32.
    `run_gate`: the run's own gate (arrays of gate.npz; its threshold is in
    `card["gate"]`), kept so that the bundle refuses exactly what the run's
    evaluation refused; refitted on the served graph for int8 or when absent.
    """
    out_dir = Path(out_dir)
    model = model.eval()
    wrapper = ExportWrapper(model, mean, std).eval()
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _export_graph(wrapper, size, staging / "model.onnx")
    random_inputs = np.random.default_rng(1).random((4, 1, size, size), dtype=np.float32)
    checks = {"random": parity(wrapper, staging / "model.onnx", random_inputs)}
    if len(real_images):
        checks["real"] = parity(wrapper, staging / "model.onnx", real_images)
    worst = max(c["max_abs_probability_diff"] for c in checks.values())
    if worst > 1e-3:
        raise CovidscanError(f"{out_dir}: ONNX export disagrees with PyTorch (max probability difference {worst:.2e})")
    precision: dict[str, object] = {"precision": "fp32"}
    if int8:
        from covidscan.export.quantize import acceptable, int8_agreement, quantize_int8

        quantize_int8(staging / "model.onnx", staging / "model.int8.onnx", gate_train[:64])
        check = int8_agreement(staging / "model.onnx", staging / "model.int8.onnx", real_images, check_labels,
                               float((card.get("calibration") or {}).get("temperature", 1.0)))  # type: ignore[union-attr]
        ok, why = acceptable(check)
        if not ok:
            shutil.rmtree(staging)
            raise CovidscanError(f"{out_dir}: int8 export refused: {why}; export without --int8")
        (staging / "model.onnx").rename(staging / "model.fp32.onnx")
        (staging / "model.int8.onnx").rename(staging / "model.onnx")
        precision = {"precision": "int8 (static QDQ, per-channel weights; fp32 graph kept as model.fp32.onnx)", "int8_check": check}

    def served_stats(images: np.ndarray) -> np.ndarray:
        from covidscan.export.quantize import onnx_run

        return onnx_run(staging / "model.onnx", images)[2]

    if run_gate is not None and not int8 and isinstance(card.get("gate"), dict):
        gate_arrays, gate_card = run_gate, dict(card["gate"])  # type: ignore[arg-type]
        with torch.no_grad():
            reference_stats = wrapper(torch.from_numpy(gate_val[:32].astype(np.float32)))[2].numpy()
        difference = np.abs(gate_distance(gate_arrays, served_stats(gate_val[:32])) - gate_distance(gate_arrays, reference_stats))
        checks["gate"] = {"images": int(min(32, len(gate_val))), "max_abs_distance_diff": float(difference.max()) if len(difference) else 0.0}
        gate_card["fitted"] = "with the run (evaluated with it); ONNX distances checked against PyTorch's"
    else:
        fitted = gate_reference(served_stats(gate_train), served_stats(gate_val))
        gate_arrays = {k: np.asarray(fitted[k]) for k in GATE_ARRAYS}
        gate_card = {"method": GATE_METHOD, "threshold": fitted["threshold"], "quantile_of_validation": GATE_QUANTILE,
                     "reference_images": int(len(gate_train)), "validation_images": int(len(gate_val)),
                     "fitted": "at export on the served graph" + (" (int8 statistics differ from the run's fp32 ones)" if int8 else "")}
    save_gate(gate_arrays, staging / "gate.npz")
    card = dict(card)
    card.update({
        "format": BUNDLE_FORMAT,
        "onnx": "model.onnx",
        "image_size": size,
        "inputs": {"name": "images", "shape": ["batch", 1, size, size], "range": [0.0, 1.0],
                   "preprocessing": f"grayscale, data.preprocess '{card.get('preprocess', 'none')}' (covidscan.data.preprocess.prepare_image: "
                                    "optional lung crop, bilinear resize to size x size, optional CLAHE), scaled to [0, 1]; normalisation is inside the graph"},
        "outputs": {"logits": "class scores (softmax(logits / temperature) = probabilities)", "features": "last feature map (CAM layer)",
                    "gate_features": f"log(1 + |mean, std|) per channel of '{model.gate_layer_name() or 'the last feature map'}' (input gate)"},
        "cam": {"weights": model.head.weight.detach().numpy().round(7).tolist(), "bias": model.head.bias.detach().numpy().round(7).tolist(),
                "method": "CAM = Grad-CAM for the GAP-linear head" + ("; decomposed classes: sub-class rows weighted by their share of the class" if model.decomposed else "")},
        "gate": {**gate_card, "file": "gate.npz"},
        "parity": checks,
        **precision,
        "exported_with": f"covidscan {__version__}, torch {torch.__version__}",
        "intended_use": DISCLAIMER,
    })
    card.pop("weights", None)
    atomic.write_text(staging / "model.json", json.dumps(card, indent=1) + "\n")
    atomic.swap_folder(staging, out_dir)
    return card


def export_run(run_dir: str | Path, out_dir: str | Path, gate_images: int = 1024, int8: bool = False) -> dict[str, object]:
    """Export a run folder's best model; parity on its test images, gate from its train/val images."""
    from covidscan.data.manifest import image_refs, load_manifest
    from covidscan.ensemble import EnsemblePredictor
    from covidscan.predict import Predictor, load_scorer

    run_dir = Path(run_dir)
    scorer = load_scorer(run_dir)
    if isinstance(scorer, EnsemblePredictor):
        return export_ensemble(scorer, out_dir, gate_images, int8)
    assert isinstance(scorer, Predictor)
    predictor = scorer
    frame = load_manifest(run_dir / "manifest.csv")
    rng = np.random.default_rng(0)

    def images_of(split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        rows = frame[frame["split"] == split]
        rows = rows.iloc[np.sort(rng.choice(len(rows), min(limit, len(rows)), replace=False))]
        images = predictor.load_images(image_refs(rows), f"loading {split} images").astype(np.float32) / 255.0
        return images, (rows["label"].astype(str) == predictor.classes[-1]).to_numpy()

    test_images, test_labels = images_of("test", 256 if int8 else 16)
    return export_model(
        predictor.model, predictor.normaliser.mean, predictor.normaliser.std, predictor.size, predictor.card, out_dir,
        test_images, images_of("train", gate_images)[0], images_of("val", gate_images)[0], int8=int8, check_labels=test_labels,
        run_gate=predictor.gate,
    )


def export_ensemble(ensemble: EnsemblePredictor, out_dir: str | Path, gate_images: int = 1024, int8: bool = False) -> dict[str, object]:
    """An ensemble bundle: each member exported (and checked) into OUT/members/<name>, the ensemble's card on top.

    Parity: the torch-free EnsembleBundle against the PyTorch EnsemblePredictor on test images.
    """
    from covidscan.data.manifest import image_refs, load_manifest
    from covidscan.model_card import ModelCard
    from covidscan.serve.predictor import EnsembleBundle

    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.ensemble-staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    member_parity = {}
    for spec in ensemble.model_card.members:
        member_card = export_run(ensemble.folder / spec.folder, staging / spec.folder, gate_images, int8)
        member_parity[spec.name] = member_card["parity"]
    card = dict(ensemble.card)
    card.update({"format": BUNDLE_FORMAT, "inputs": {"shape": ["batch", 1, ensemble.size, ensemble.size], "range": [0.0, 1.0],
                 "preprocessing": f"grayscale, data.preprocess '{ensemble.model_card.preprocess}' (as each member); "
                                  "each member bundle normalises inside its graph"},
                 "exported_with": f"covidscan {__version__}, torch {torch.__version__}", "intended_use": DISCLAIMER})
    frame = load_manifest(ensemble.folder / "manifest.csv")
    rows = frame[frame["split"] == "test"].head(16)
    images = ensemble.load_images(image_refs(rows), "loading test images")
    reference = ensemble.calibrated(ensemble.score(images)[0])
    served = EnsembleBundle(staging, ModelCard.from_json(card)).analyse(list(images[:, 0]), heatmaps=False)  # the card in memory
    served_probs = np.array([[r.probabilities[c] for c in ensemble.classes] for r in served])
    worst = float(np.abs(served_probs - reference).max()) if len(served) else 0.0
    if worst > 1e-3 and not int8:
        shutil.rmtree(staging)
        raise CovidscanError(f"{out_dir}: the exported ensemble disagrees with PyTorch (max probability difference {worst:.2e})")
    card["parity"] = {"real": {"images": int(len(served)), "max_abs_probability_diff": worst}, "members": member_parity}
    atomic.write_text(staging / "model.json", json.dumps(card, indent=1) + "\n")
    atomic.swap_folder(staging, out_dir)
    return card
