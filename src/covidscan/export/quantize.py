"""Optional int8 quantisation of an exported graph, checked against the fp32 graph before it is used.

Static QDQ quantisation (per-channel weights, activations calibrated on
training images) makes the CPU service faster; it also changes the
probabilities a little, so the export measures how much on held-out images
and refuses the int8 graph when its decisions or AUC drift.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_LABEL_AGREEMENT = 0.99  # share of held-out images whose decision at 0.5 must not change
MAX_AUC_DROP = 0.01


def onnx_run(path: Path, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """All outputs of an ONNX graph over images (N, 1, S, S) float32, batched."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {"images": images[s : s + batch_size]}) for s in range(0, len(images), batch_size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))] if parts else []


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Write the int8 (QDQ) graph, activation ranges calibrated on `calibration` images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = int8_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    prepared.unlink()


def _softmax_positive(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True))[:, -1]


def int8_agreement(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray | None, temperature: float) -> dict[str, float | int]:
    """How far the int8 graph's positive-class probabilities and decisions are from fp32's."""
    from covidscan.evaluate.metrics import auc_roc

    p32 = _softmax_positive(onnx_run(fp32_path, images)[0], temperature)
    p8 = _softmax_positive(onnx_run(int8_path, images)[0], temperature)
    out: dict[str, float | int] = {
        "images": int(len(images)),
        "max_abs_probability_diff": float(np.abs(p32 - p8).max()),
        "mean_abs_probability_diff": float(np.abs(p32 - p8).mean()),
        "label_agreement": float(((p32 >= 0.5) == (p8 >= 0.5)).mean()),
    }
    if labels is not None and len(np.unique(labels)) == 2:
        out["auc_fp32"], out["auc_int8"] = auc_roc(labels, p32), auc_roc(labels, p8)
    return out


def acceptable(check: dict[str, float | int]) -> tuple[bool, str]:
    if float(check["label_agreement"]) < MIN_LABEL_AGREEMENT:
        return False, f"int8 changes {1 - float(check['label_agreement']):.1%} of decisions on held-out images (limit {1 - MIN_LABEL_AGREEMENT:.0%})"
    if "auc_int8" in check and float(check["auc_fp32"]) - float(check["auc_int8"]) > MAX_AUC_DROP:
        return False, f"int8 lowers the held-out AUC from {check['auc_fp32']:.3f} to {check['auc_int8']:.3f}"
    return True, ""
