"""Heat-map overlays as PNG bytes, with numpy and Pillow only (no torch: the service uses this too)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A perceptually ordered blue -> cyan -> yellow -> red ramp (anchor colours, linearly interpolated).
_RAMP = np.array(
    [[0, 0, 130], [0, 90, 255], [0, 220, 220], [130, 255, 100], [255, 220, 0], [255, 90, 0], [180, 0, 0]], np.float32
)


def _lookup_table() -> np.ndarray:
    """256 RGB entries interpolated between the ramp's anchors."""
    position = np.linspace(0.0, len(_RAMP) - 1, 256)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[:, None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


_LUT = _lookup_table()


def colorize(heat: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (H, W) to RGB uint8 (H, W, 3) through a 256-entry table."""
    index = (np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return _LUT[index]


def resize_heat(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a heat map to the image's size."""
    if heat.shape == (height, width):
        return heat.astype(np.float32)
    image = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32)


def overlay(gray: np.ndarray, heat: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a heat map in [0, 1] over a gray image (uint8 or [0, 1] float) -> RGB uint8."""
    gray = np.asarray(gray)
    base = gray.astype(np.float32) / (255.0 if gray.dtype == np.uint8 else 1.0)
    heat = resize_heat(heat, *base.shape)
    rgb = np.repeat(base[..., None] * 255.0, 3, axis=2)
    alpha = opacity * np.clip(heat, 0.0, 1.0)[..., None]  # cold regions stay readable
    return (rgb * (1 - alpha) + colorize(heat).astype(np.float32) * alpha).round().clip(0, 255).astype(np.uint8)


def png_bytes(rgb_or_gray: np.ndarray, fast: bool = False) -> bytes:
    """PNG bytes; `fast` trades ~2x size for ~10x less CPU (the service answers per request)."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.asarray(rgb_or_gray, np.uint8))
    if fast:
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
