"""Intensity mapping shared by every reader: the CT window and the finite [0, 1] guarantee."""
from __future__ import annotations

import numpy as np

# CT window for lungs (width, level) in Hounsfield units, as radiologists read them.
LUNG_WINDOW = (1500.0, -600.0)


def window(values: np.ndarray, width: float, level: float, in_place: bool = False) -> np.ndarray:
    """Map a (width, level) window of HU values onto [0, 1]; `in_place` reuses a float32 array (no full-size copy)."""
    out = values if in_place and values.dtype == np.float32 else values.astype(np.float32)
    out -= np.float32(level - width / 2.0)
    out /= np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def finite01(pixels: np.ndarray) -> np.ndarray:
    """NaN -> 0 and everything clipped to [0, 1], in place: no image reaches a model with non-finite values."""
    np.nan_to_num(pixels, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(pixels, 0.0, 1.0, out=pixels)
