"""Preprocessing and batched augmentation on whole tensors (CPU or GPU).

The data set is held as uint8 (N, 1, H, W); a batch is turned into float,
augmented with one affine warp for the whole batch, then normalised with the
backbone's statistics. No per-image Python loop, so the same code feeds a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covidscan.models.registry import BackboneSpec


@dataclass(frozen=True)
class Normaliser:
    """Gray-input normalisation: the mean/std of the RGB statistics.

    The first convolution's RGB filters are summed for gray input, so a gray
    image normalised with the averaged statistics matches what the RGB
    network saw for a gray picture.
    """

    mean: float
    std: float

    @classmethod
    def for_backbone(cls, spec: BackboneSpec) -> Normaliser:
        return cls(mean=sum(spec.mean) / 3.0, std=sum(spec.std) / 3.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return batch.float().div_(255.0)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05  # fraction of the image size
    hflip: bool = True  # left/right lungs are roughly symmetric
    brightness: float = 0.08
    contrast: float = 0.15
    gamma: float = 0.15
    noise_std: float = 0.01


def augment(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Random affine warp + flip + brightness/contrast/gamma + noise, per image, in one pass.

    `x` is float in [0, 1] on any device; random numbers come from a CPU
    generator so that results do not depend on the device's RNG.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).to(x.device)

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * (math.pi / 180.0)
    scale = uniform(*cfg.scale)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=x.device)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(-cfg.gamma, cfg.gamma)).view(n, 1, 1, 1)
    x = x.clamp(0, 1).pow(gamma)
    contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast).view(n, 1, 1, 1)
    brightness = uniform(-cfg.brightness, cfg.brightness).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if cfg.noise_std > 0:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = x + cfg.noise_std * noise
    return x.clamp(0, 1)
