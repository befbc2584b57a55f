"""Image embeddings from a pretrained backbone: for similarity clusters, leakage checks and t-SNE.

ImageNet features are not trained for CT, but they are good at "these two
slices look alike", which is what grouping and leakage checks need.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidscan import atomic
from covidscan.data.manifest import image_refs

from covidscan.data.transforms import Normaliser, to_float
from covidscan.models.classifier import CovidClassifier
from covidscan.models.registry import get_backbone
from covidscan.progress import track

DEFAULT_EMBED_SIZE = 160  # px: cheaper than 224 on CPU, and enough to tell slices apart


@torch.no_grad()
def embed_array(
    model: CovidClassifier, images: np.ndarray, normaliser: Normaliser, batch_size: int = 64, show: bool = True
) -> np.ndarray:
    """L2-normalised pooled features (N, C) for uint8 images (N, 1, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    starts = list(range(0, len(images), batch_size))
    for start in track(starts, "embedding images", show):
        batch = normaliser(to_float(torch.from_numpy(images[start : start + batch_size]).to(device)))
        out.append(torch.nn.functional.normalize(model.embed(batch).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_features), np.float32)


def embed_images(
    refs: Sequence[tuple[str, int | None]],
    backbone: str = "efficientnet_lite0",
    weights: str = "imagenet",
    size: int = DEFAULT_EMBED_SIZE,
    show: bool = True,
) -> np.ndarray:
    """Read, resize and embed images with a pretrained backbone (no training)."""
    from covidscan.data.io import load_image_array

    model = CovidClassifier(backbone, num_classes=2, in_chans=1, weights=weights)
    images = load_image_array(refs, size, "loading images for embeddings", show)
    return embed_array(model, images, Normaliser.for_backbone(get_backbone(backbone)), show=show)


def _refs_digest(refs: Sequence[tuple[str, int | None]], backbone: str, size: int) -> str:
    text = "\n".join(f"{p}|{s}" for p, s in refs) + f"|{backbone}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_embeddings(
    frame: pd.DataFrame, cache: str | Path | None = None, backbone: str = "efficientnet_lite0", size: int = DEFAULT_EMBED_SIZE, show: bool = True
) -> np.ndarray:
    """Embeddings of a manifest's images, reusing `cache` (.npz) when it holds the same images."""
    refs = image_refs(frame)
    digest = _refs_digest(refs, backbone, size)
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as stored:
            if str(stored["digest"]) == digest:
                return stored["embeddings"]
    embeddings = embed_images(refs, backbone, size=size, show=show)
    if cache is not None:
        atomic.write_with(cache, lambda tmp: np.savez(open(tmp, "wb"), embeddings=embeddings, digest=np.array(digest)))
    return embeddings
