"""Self-supervised pretraining on unlabelled CT slices (SimCLR; issue 14).

ImageNet features know nothing of CT, and a hospital has far more unlabelled
slices than labelled ones. Contrastive pretraining continues the ImageNet
backbone on those slices: two augmented views of a slice must map close
together and away from the batch's other slices (Chen et al., 2020). The
views also imitate other image sources (figure borders, JPEG, window/level),
so the features learn to ignore how a slice was produced. The result is an
ordinary weights file in the timm layout: `--set model.weights=FILE`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidscan import atomic
from covidscan.errors import DataError
from covidscan.data.source_augment import imitate_sources
from covidscan.data.transforms import AugmentConfig, Normaliser, augment, to_float
from covidscan.models.classifier import CovidClassifier, build_imagenet_model
from covidscan.models.registry import get_backbone

# Stronger than training's augmentation: the views of one slice must differ enough for the task to teach anything.
VIEW_AUGMENT = AugmentConfig(rotation_deg=15.0, scale=(0.7, 1.2), shift=0.1, brightness=0.15, contrast=0.3, gamma=0.3, noise_std=0.02)
MIN_IMAGES = 64


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2N - 1 embeddings of the batch."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = first.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partner)


def _views(batch: torch.Tensor, generator: torch.Generator, source_augment: float) -> torch.Tensor:
    view = augment(batch, generator, VIEW_AUGMENT)
    return imitate_sources(view, generator, source_augment) if source_augment > 0 else view


def timm_state_dict(model: CovidClassifier, start_weights: str) -> dict[str, torch.Tensor]:
    """The pretrained backbone in the layout `model.weights=FILE` loads: a full timm model with RGB input and
    its ImageNet head (unused). The gray stem is spread over three channels, which sum back to it."""
    full, _ = build_imagenet_model(model.spec, start_weights)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    for key, tensor in model.backbone.state_dict().items():
        if key not in state:
            continue
        if tensor.shape != state[key].shape and tensor.dim() == 4 and tensor.shape[1] == 1:
            tensor = tensor.repeat(1, state[key].shape[1], 1, 1) / state[key].shape[1]
        state[key] = tensor.detach().clone().contiguous()
    return state


def pretrain_backbone(
    images: np.ndarray, backbone: str, start_weights: str = "imagenet", epochs: int = 10, batch_size: int = 64,
    lr: float = 1e-4, temperature: float = 0.2, source_augment: float = 0.5, seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[CovidClassifier, list[dict[str, float]]]:
    """SimCLR on uint8 images (N, 1, S, S); returns the network (its backbone pretrained) and the loss per epoch."""
    torch.manual_seed(seed)
    model = CovidClassifier(backbone, 2, 1, 0.0, start_weights)
    projector = nn.Sequential(nn.Linear(model.num_features, 256), nn.ReLU(), nn.Linear(256, 128))
    optimizer = torch.optim.Adam([{"params": model.backbone.parameters(), "lr": lr},
                                  {"params": projector.parameters(), "lr": lr * 10}])
    normaliser = Normaliser.for_backbone(get_backbone(backbone))
    data = torch.from_numpy(np.ascontiguousarray(images))
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(epochs):
        started, generator = time.perf_counter(), torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order, total, seen = torch.randperm(len(data), generator=generator), 0.0, 0
        for start in range(0, len(data) - 1, batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                break
            batch = to_float(data[index])
            pair = torch.cat([_views(batch, generator, source_augment), _views(batch, generator, source_augment)])
            embedded = projector(model.forward_features(normaliser(pair)).mean(dim=(2, 3)))
            loss = nt_xent(embedded[: len(index)], embedded[len(index) :], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(index), seen + len(index)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": round(time.perf_counter() - started, 2)})
        log(f"pretrain epoch {epoch + 1}/{epochs}: contrastive loss {history[-1]['loss']:.4f} ({history[-1]['seconds']:.1f} s)")
    model.eval()
    return model, history


def save_pretrained(model: CovidClassifier, start_weights: str, out: str | Path, record: dict[str, object]) -> Path:
    """Write the weights file (safetensors, timm layout) and, beside it, a JSON record of how it was made."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = timm_state_dict(model, start_weights)
    atomic.write_with(out, lambda tmp: save_file(state, str(tmp)))
    atomic.write_json(out.with_suffix(".json"), record)
    return out


def pretrain_file(images: np.ndarray, out: str | Path, backbone: str, size: int, name: str, start_weights: str = "imagenet",
                  epochs: int = 10, batch_size: int = 64, lr: float = 1e-4, preprocess: str = "none", seed: int = 0,
                  log: Callable[[str], None] = print) -> Path:
    """Pretrain and save; the record says on what, how, and that no label was used."""
    if len(images) < MIN_IMAGES:
        raise DataError(name, f"{len(images)} images; contrastive pretraining needs at least {MIN_IMAGES}")
    model, history = pretrain_backbone(images, backbone, start_weights, epochs, batch_size, lr, seed=seed, log=log)
    record = {"method": "SimCLR contrastive pretraining (no labels used)", "backbone": backbone, "started_from": model.weights_source,
              "images": int(len(images)), "data": name, "image_size": size, "preprocess": preprocess, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "seed": seed, "history": history,
              "use": f"--set model.weights={Path(out).name} --set data.image_size={size} --set data.preprocess={preprocess}"}
    path = save_pretrained(model, start_weights, out, record)
    log(f"pretrained {backbone} on {len(images)} unlabelled images of {name} -> {path} (record: {path.with_suffix('.json').name})")
    return path
