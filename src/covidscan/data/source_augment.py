"""Augmentation that imitates other image sources (issue 14, `train.source_augment`).

A model trained on one hospital's clean PNG exports meets, elsewhere, slices
that went through other windows, screenshots, papers and web pages: lower
resolution, JPEG blocks, a different window/level, white figure borders,
arrows and panel letters, blur and noise. Each of these is drawn here with
probability `p` per image, on the float batch in [0, 1] (N, 1, H, W), from a
CPU generator so that a resumed epoch repeats exactly. The whole batch goes
through the vectorised steps; only the chosen images go through the few
per-image ones (JPEG, resampling, marks), so the cost stays small on a CPU.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import gaussian_blur

STEPS = ("window", "framing", "marks", "resolution", "blur", "jpeg", "noise")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _window(x: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Another window/level: the gray range is cut or widened (washed-out or saturated lungs)."""
    n = x.shape[0]
    low = torch.where(chosen, _uniform(n, -0.25, 0.25, generator), torch.zeros(n)).to(x).view(n, 1, 1, 1)
    high = torch.where(chosen, _uniform(n, 0.75, 1.25, generator), torch.ones(n)).to(x).view(n, 1, 1, 1)
    return ((x - low) / (high - low)).clamp(0, 1)


def _framing(x: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tighter crop (zoom in) or the slice shrunk into a figure with a white, gray or black border."""
    n = x.shape[0]
    zoom = torch.where(chosen, _uniform(n, 0.7, 1.6, generator), torch.ones(n))  # < 1 crops, > 1 adds a border
    reach = (zoom - 1).abs()
    tx, ty = _uniform(n, -1, 1, generator) * reach, _uniform(n, -1, 1, generator) * reach
    fill = torch.where(torch.rand(n, generator=generator) < 0.6, torch.ones(n), torch.rand(n, generator=generator) * 0.3)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([zoom, zero, tx], 1), torch.stack([zero, zoom, ty], 1)], 1).to(x)
    index = chosen.nonzero().flatten().to(x.device)  # only the chosen images are resampled
    if index.numel() == 0:
        return x
    part = x[index]
    grid = F.affine_grid(theta[index], list(part.shape), align_corners=False)
    warped = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(part), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = x.clone()
    out[index] = warped + (1 - inside) * fill.to(x)[index].view(-1, 1, 1, 1)
    return out


def _segment_mask(size: int, start: torch.Tensor, end: torch.Tensor, width: float) -> torch.Tensor:
    """Pixels within `width` of the segment start-end (pixel coordinates), as a (size, size) bool mask.

    Only the segment's bounding box is measured: a mark covers a few dozen pixels of the image.
    """
    mask = torch.zeros(size, size, dtype=torch.bool)
    x0, y0 = (torch.minimum(start, end) - width).floor().clamp(0, size - 1).int().tolist()
    x1, y1 = (torch.maximum(start, end) + width).ceil().clamp(0, size - 1).int().tolist()
    ys, xs = torch.meshgrid(torch.arange(y0, y1 + 1, dtype=torch.float32), torch.arange(x0, x1 + 1, dtype=torch.float32), indexing="ij")
    point = torch.stack([xs, ys], -1)
    direction = end - start
    t = (((point - start) @ direction) / direction.dot(direction).clamp_min(1e-6)).clamp(0, 1)
    nearest = start + t.unsqueeze(-1) * direction
    mask[y0 : y1 + 1, x0 : x1 + 1] = (point - nearest).norm(dim=-1) <= width
    return mask


def _marks(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One to three annotations of a figure: an arrow (a line with a head) or a block letter, white or black."""
    size = image.shape[-1]
    out = image.clone()
    for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
        value = 1.0 if float(torch.rand(1, generator=generator)) < 0.7 else 0.0
        start = torch.rand(2, generator=generator) * size
        if float(torch.rand(1, generator=generator)) < 0.5:  # arrow: shaft and two barbs
            angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
            length = size * float(_uniform(1, 0.1, 0.25, generator))
            tip = start + length * torch.tensor([math.cos(angle), math.sin(angle)])
            mask = _segment_mask(size, start, tip, max(0.6, size / 160))
            for barb in (angle + 2.6, angle - 2.6):
                mask |= _segment_mask(size, tip, tip + 0.3 * length * torch.tensor([math.cos(barb), math.sin(barb)]), max(0.6, size / 160))
        else:  # block letter: a small outlined box with a bar, near the border like a panel label
            corner = torch.tensor([float(torch.rand(1, generator=generator) < 0.5), float(torch.rand(1, generator=generator) < 0.5)])
            start = corner * size * 0.85 + torch.rand(2, generator=generator) * size * 0.1
            box = size * float(_uniform(1, 0.04, 0.09, generator))
            a, b, c, d = start, start + torch.tensor([box, 0.0]), start + torch.tensor([box, box * 1.4]), start + torch.tensor([0.0, box * 1.4])
            mask = torch.zeros(size, size, dtype=torch.bool)
            for p, q in ((a, b), (b, c), (c, d), (d, a), ((a + d) / 2, (b + c) / 2)):
                mask |= _segment_mask(size, p, q, max(0.6, size / 200))
        out[..., mask.to(image.device)] = value
    return out


def _resolution(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Resolution loss: down to 25-60 % of the side, then back up (a thumbnail or a screenshot)."""
    size = image.shape[-1]
    small = max(8, int(size * float(_uniform(1, 0.25, 0.6, generator))))
    reduced = F.interpolate(image.unsqueeze(0), size=(small, small), mode="area")
    return F.interpolate(reduced, size=image.shape[-2:], mode="bilinear", align_corners=False).squeeze(0)


def _blur(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = float(_uniform(1, 0.4, 1.2, generator))
    return gaussian_blur(image, [5, 5], [sigma, sigma])


def _jpeg(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """JPEG artefacts at quality 15-60, the range of figures saved for the web (Pillow's encoder)."""
    quality = int(torch.randint(15, 61, (1,), generator=generator))
    gray = image[0].mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded).to(image.device, image.dtype).unsqueeze(0)


def _noise(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    std = float(_uniform(1, 0.01, 0.05, generator))
    return image + std * torch.randn(image.shape, generator=generator).to(image.device)


PER_IMAGE = {"marks": _marks, "resolution": _resolution, "blur": _blur, "jpeg": _jpeg, "noise": _noise}


def imitate_sources(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Apply each step of STEPS to each image with probability `p`; returns a new float batch in [0, 1]."""
    if p <= 0:
        return x
    n = x.shape[0]
    chosen = {step: torch.rand(n, generator=generator) < p for step in STEPS}
    x = _window(x, chosen["window"], generator)
    x = _framing(x, chosen["framing"], generator)
    images = list(x.clamp(0, 1).unbind(0))
    for step in ("marks", "resolution", "blur", "jpeg", "noise"):
        for i in chosen[step].nonzero().flatten().tolist():
            images[i] = PER_IMAGE[step](images[i], generator)
    return torch.stack(images).clamp(0, 1)
