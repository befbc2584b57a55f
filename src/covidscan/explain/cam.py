"""Class activation maps through the `grad-cam` package, on each backbone's registered layer."""
from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from covidscan.data.transforms import Normaliser, to_float
from covidscan.errors import ConfigError
from covidscan.models.classifier import CovidClassifier

CAM_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,  # one forward pass per channel: slow on a CPU
}


def heatmaps(
    model: CovidClassifier,
    images: np.ndarray,
    normaliser: Normaliser,
    target_class: int,
    method: str = "gradcam",
    batch_size: int = 16,
) -> np.ndarray:
    """Heat maps (N, H, W) in [0, 1] for uint8 images (N, 1, H, W), explaining `target_class`."""
    if method not in CAM_METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    with CAM_METHODS[method](model=model, target_layers=[model.cam_target_layer()]) as cam:
        for start in range(0, len(images), batch_size):
            batch = normaliser(to_float(torch.from_numpy(images[start : start + batch_size]).to(device)))
            targets = [ClassifierOutputTarget(target_class)] * len(batch)
            out.append(np.asarray(cam(input_tensor=batch, targets=targets), np.float32))
    if not out:
        return np.zeros((0,) + images.shape[2:], np.float32)
    return np.clip(np.concatenate(out), 0.0, 1.0)
