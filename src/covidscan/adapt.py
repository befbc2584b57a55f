"""Test-time adaptation to a new hospital from its unlabelled images (AdaBN or TENT).

A network trained on one hospital normalises every feature map with that
hospital's batch-norm statistics; on another scanner, protocol or image
source the statistics are off and so are the outputs. AdaBN re-estimates the
statistics on the new hospital's unlabelled images; nothing else changes.
TENT (entropy minimisation) goes one step further: it also trains the
batch-norm layers' scale and shift so that the network is confident on the
new hospital's images, every other weight frozen.
The adapted run is a new run folder: its input gate is refitted on the new
hospital's images (what it accepts is now *that* hospital's kind of image),
and its calibration and operating points are reset to the plain 0.5 decision,
since no labelled image of the new hospital exists to fit them on.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidscan import atomic
from covidscan.errors import CovidscanError, DataError
from covidscan.model_card import NETWORK
from covidscan.models.classifier import CovidClassifier

ADAPT_METHODS = ("adabn", "tent")
METHOD_CARDS = {
    "adabn": "AdaBN (batch-norm statistics re-estimated; no weight changed)",
    "tent": "TENT (entropy minimisation: batch-norm statistics re-estimated, batch-norm scale and shift trained; no other weight changed)",
}
RUN_FILES = ("config.yaml", "manifest.csv", "metrics.json", "history.jsonl", "embeddings.npz")
MIN_IMAGES = 32  # fewer unlabelled images give batch-norm statistics too noisy to trust


@torch.no_grad()
def adabn(model: CovidClassifier, images: np.ndarray, normaliser: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64) -> int:
    """Replace every BatchNorm layer's running statistics with those of `images` (uint8 (N, 1, S, S)); returns the layer count.

    Cumulative averages (momentum None) over all images, in training mode for
    the BatchNorm layers only (dropout stays off).
    """
    from covidscan.data.transforms import to_float

    layers = _batch_norm_layers(model)
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    for start in range(0, len(images), batch_size):
        model.forward_features(normaliser(to_float(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))))
    for layer in layers:
        layer.momentum = 0.1
    model.eval()
    return len(layers)


def _batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def entropy_minimisation(model: CovidClassifier, images: np.ndarray, normaliser: Callable[[torch.Tensor], torch.Tensor],
                         epochs: int = 1, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> int:
    """TENT (Wang et al., ICLR 2021): minimise the entropy of the predictions on `images` by training only the
    batch-norm affine parameters, with batch statistics; returns the batch-norm layer count.

    Starts from AdaBN's statistics and ends with them re-estimated for the trained scale and shift, so that the
    deployed network (evaluation mode, running statistics) is the one that was adapted.
    """
    from covidscan.data.transforms import to_float

    layers = _batch_norm_layers(model)
    adabn(model, images, normaliser, batch_size)
    affine = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if not affine:
        return len(layers)
    trainable = {id(p) for p in affine}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(affine, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    for layer in layers:
        layer.train()  # batch statistics, as TENT
    try:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator).numpy()
            for start in range(0, len(images), batch_size):
                index = np.sort(order[start : start + batch_size])
                if len(index) < 2:  # batch-norm needs two images
                    continue
                batch = normaliser(to_float(torch.from_numpy(np.ascontiguousarray(images[index]))))
                probs = torch.softmax(model(batch), dim=1)
                loss = -(probs * torch.log(probs.clamp_min(1e-8))).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
    adabn(model, images, normaliser, batch_size)
    return len(layers)


def _halves(frame: pd.DataFrame, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows for the gate's reference and rows for its threshold: whole patients (or images) on each side."""
    keys = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame.columns else np.full(len(frame), "")
    keys = np.where(keys == "", np.arange(len(frame)).astype(str), keys)
    names = np.unique(keys)
    held = set(np.random.default_rng(seed).choice(names, max(1, len(names) // 5), replace=False))
    mask = np.array([k in held for k in keys])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def adapt_run(run_dir: str | Path, unlabelled: pd.DataFrame, out: str | Path, name: str, show: bool = True,
              log: Callable[[str], None] = print, method: str = "adabn") -> dict[str, object]:
    """Adapt the run's network to `unlabelled` images (labels, if any, are ignored) with AdaBN or TENT; write and evaluate OUT."""
    from covidscan.data.manifest import image_refs
    from covidscan.decision import DEFAULT_STUDY_RULE
    from covidscan.evaluate.evaluation import evaluate_run, fit_run_gate, gate_sample
    from covidscan.gate import save_gate
    from covidscan.predict import MODEL_CARD, Predictor
    from covidscan.train.checkpoint import save_checkpoint

    if method not in ADAPT_METHODS:
        raise CovidscanError(f"unknown adaptation method {method!r}; choose one of {', '.join(ADAPT_METHODS)}")
    run_dir, out = Path(run_dir), Path(out)
    source = Predictor(run_dir)
    if source.model_card.kind != NETWORK:
        raise CovidscanError(f"{run_dir}: adapt works on one network; adapt each member of an ensemble, then combine them again")
    if len(unlabelled) < MIN_IMAGES:
        raise DataError(name, f"{len(unlabelled)} unlabelled images; adaptation needs at least {MIN_IMAGES} to estimate batch-norm statistics")
    if out.exists() and any(out.iterdir()):
        raise CovidscanError(f"{out}: folder exists and is not empty; choose another -o")
    images = source.load_images(image_refs(unlabelled), f"loading {name}", show)
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "checkpoints").mkdir(parents=True)
    for item in RUN_FILES:
        if (run_dir / item).is_file():
            shutil.copyfile(run_dir / item, staging / item)
    if (run_dir / "external").is_dir():
        shutil.copytree(run_dir / "external", staging / "external")
    model = source.model
    if not _batch_norm_layers(model):
        raise CovidscanError(f"{run_dir}: the network has no batch-norm layer; {method} cannot adapt it")
    layers = adabn(model, images, source.normaliser) if method == "adabn" else entropy_minimisation(model, images, source.normaliser)
    save_checkpoint(staging / "checkpoints" / "best.safetensors", model, {"adapted": method})
    reference, threshold = _halves(unlabelled)
    stats = source.score(images, tta=False)[1]  # source.model is the adapted network now
    arrays, gate_card = fit_run_gate(stats[reference][gate_sample(len(reference))], stats[threshold][gate_sample(len(threshold))])
    gate_card["fitted_on"] = f"{name}: unlabelled images of the new hospital ({len(reference)} reference, {len(threshold)} for the threshold, whole patients apart)"
    save_gate(arrays, staging / "gate.npz")
    card = source.card
    card.update({
        "weights": "checkpoints/best.safetensors",
        "gate": gate_card,
        "calibration": {"temperature": 1.0, "kept": False, "method": "none", "operating_points": {"default": 0.5},
                        "reason": "reset by adaptation: no labelled image of the new hospital to fit a temperature or thresholds on; "
                                  "the source hospital's no longer apply"},
        "study_rule": {**DEFAULT_STUDY_RULE, "chosen_on": "default: reset by adaptation (no labelled patients of the new hospital)"},
        "adaptation": {"method": METHOD_CARDS[method], "batch_norm_layers": layers,
                       "unlabelled_images": int(len(images)), "data": name, "source_run": run_dir.name},
    })
    atomic.write_json(staging / MODEL_CARD, card)
    atomic.swap_folder(staging, out)
    log(f"adapted {run_dir} to {len(images)} unlabelled images of {name} ({method}, {layers} batch-norm layers) -> {out}; "
        f"gate refitted (threshold {float(gate_card['threshold']):.1f}), calibration reset")
    return evaluate_run(out, None, None, show, log)
