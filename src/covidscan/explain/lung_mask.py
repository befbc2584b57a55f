"""A simple lung mask for chest CT slices, and how much heat-map energy falls inside it.

Threshold (Otsu) + morphology: the body is the largest bright component;
lungs are dark regions enclosed by it (air outside the body touches the
border and is dropped). Good enough to ask "does the model look at the
lungs?"; not a segmentation for clinical use. Returns None when no
plausible lung region is found (then the figure is not computed).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

MIN_LUNG_SHARE = 0.02  # of the image: smaller dark regions are vessels, airways or noise
MAX_LUNG_SHARE = 0.80


def lung_mask(gray: np.ndarray) -> np.ndarray | None:
    """Boolean (H, W) lung mask of a CT slice (uint8 or float), or None."""
    image = np.asarray(gray, np.float32)
    if image.max() > 1.0:
        image = image / 255.0
    if float(image.max() - image.min()) < 1e-3:
        return None
    dark = image <= threshold_otsu(image)
    # The body: the largest bright component, small gaps in its wall closed, then filled.
    bright, count = ndimage.label(ndimage.binary_closing(~dark, iterations=2))
    if count == 0:
        return None
    body = bright == (np.argmax(ndimage.sum(np.ones_like(bright), bright, index=np.arange(1, count + 1))) + 1)
    body = ndimage.binary_fill_holes(body)
    inside = dark & body
    inside = ndimage.binary_opening(inside, iterations=1)
    labels, count = ndimage.label(inside)
    if count == 0:
        return None
    sizes = ndimage.sum(inside, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= MIN_LUNG_SHARE * image.size) + 1
    mask = np.isin(labels, keep)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))
    share = float(mask.mean())
    if not MIN_LUNG_SHARE <= share <= MAX_LUNG_SHARE:
        return None
    return mask


def energy_inside(heat: np.ndarray, mask: np.ndarray | None) -> float:
    """Share of the heat map's total energy inside the mask (NaN without a mask or heat)."""
    if mask is None:
        return float("nan")
    heat = np.clip(np.asarray(heat, np.float64), 0.0, None)
    total = heat.sum()
    return float(heat[mask].sum() / total) if total > 0 else float("nan")


LUNG_CHECK_SIZE = 64  # px: enough to find a lung region, cheap enough for every slice of a 300-slice study


def shows_lung(image: np.ndarray) -> bool:
    """Whether a slice shows lung: a plausible lung region is found at 64 px (the study evidence rule's lung check)."""
    from PIL import Image

    gray = np.asarray(image)
    if gray.ndim == 3:
        gray = gray[0]
    if gray.dtype != np.uint8:
        gray = np.clip(np.asarray(gray, np.float32) * 255.0, 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(gray).resize((LUNG_CHECK_SIZE, LUNG_CHECK_SIZE), Image.BILINEAR))
    return lung_mask(small) is not None
