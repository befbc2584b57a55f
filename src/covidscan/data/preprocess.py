"""How a gray image becomes the model's input: the same function in training, evaluation and the service.

Methods (`data.preprocess`, recorded in the model card):
- none: a plain resize to size x size (the seed studies');
- lung_crop: crop to the lungs' bounding box (with a margin) before resizing, so
  borders, letters, arrows and the body outline of another hospital's images
  weigh less; an image without a plausible lung region is resized uncropped;
- clahe: contrast-limited adaptive histogram equalisation after resizing, which
  evens out windowing and exposure differences between sources;
- lung_crop+clahe: both;
- histeq: global histogram equalisation after resizing: every image's gray levels
  matched to one fixed (uniform) histogram, whatever its source's exposure;
- lung_zscore: intensities standardised by the mean and SD of the pixels inside the
  lung mask (the whole image when no lung is found), then z in [-3, 3] mapped onto
  [0, 1]: the lungs of every source get one brightness and contrast.
Torch-free: the service imports it.
"""
from __future__ import annotations

import numpy as np

PREPROCESSING = ("none", "lung_crop", "clahe", "lung_crop+clahe", "histeq", "lung_zscore")
ZSCORE_RANGE = 3.0  # lung_zscore: z from -3 to 3 fills the 8-bit range
MASK_SIZE = 160  # px: the lung mask is found on a small copy; the crop is cut from the full image
CROP_MARGIN = 0.08  # of the box's side, on each side


def content_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """Box of the largest region that is not the image's border colour: the scan inside a paper figure's white
    margin and captions, or the body inside a scan's black air. The whole image when nothing stands out."""
    from scipy import ndimage

    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    near = np.abs(pixels - float(np.median(border))) < 0.04
    labels, _ = ndimage.label(near)
    touching = np.setdiff1d(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])), [0])
    content, count = ndimage.label(~np.isin(labels, touching))
    if count == 0:
        return 0, pixels.shape[0], 0, pixels.shape[1]
    largest = np.argmax(ndimage.sum(np.ones_like(content), content, index=np.arange(1, count + 1))) + 1
    rows, cols = np.flatnonzero((content == largest).any(axis=1)), np.flatnonzero((content == largest).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def lung_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the lungs in full-image pixels, with a margin; None without a plausible lung region."""
    from covidscan.data.io import resize_gray
    from covidscan.explain.lung_mask import lung_mask

    small = resize_gray(pixels, MASK_SIZE).astype(np.float32) / 255.0
    c_top, c_bottom, c_left, c_right = content_box(small)
    if c_bottom - c_top < 16 or c_right - c_left < 16:
        return None
    mask = lung_mask(resize_gray(small[c_top:c_bottom, c_left:c_right], MASK_SIZE))
    if mask is None:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = pixels.shape
    # mask pixels -> content-box pixels of the small copy -> full-image pixels
    inner_y, inner_x = (c_bottom - c_top) / MASK_SIZE, (c_right - c_left) / MASK_SIZE
    scale_y, scale_x = height / MASK_SIZE, width / MASK_SIZE
    top, bottom = (c_top + rows[0] * inner_y) * scale_y, (c_top + (rows[-1] + 1) * inner_y) * scale_y
    left, right = (c_left + cols[0] * inner_x) * scale_x, (c_left + (cols[-1] + 1) * inner_x) * scale_x
    margin_y, margin_x = CROP_MARGIN * (bottom - top), CROP_MARGIN * (right - left)
    box = (int(max(0, top - margin_y)), int(min(height, bottom + margin_y)), int(max(0, left - margin_x)), int(min(width, right + margin_x)))
    return box if box[1] - box[0] >= 8 and box[3] - box[2] >= 8 else None


def prepare_image(pixels: np.ndarray, size: int, method: str = "none") -> np.ndarray:
    """Gray float image in [0, 1] of any size -> uint8 (size, size), by `method`."""
    return prepare_with_box(pixels, size, method)[0]


def prepare_with_box(pixels: np.ndarray, size: int, method: str = "none") -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """`prepare_image`, and the part of the image the model saw as (top, bottom, left, right) fractions of its
    height and width (the whole image unless lung_crop cut a box): viewers place the heat map there."""
    from covidscan.data.io import resize_gray

    if method not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {method!r}; choose one of {', '.join(PREPROCESSING)}")
    pixels = np.asarray(pixels, np.float32)
    height, width = pixels.shape
    seen = (0.0, 1.0, 0.0, 1.0)
    if "lung_crop" in method:
        box = lung_box(pixels)
        if box is not None:
            pixels = pixels[box[0] : box[1], box[2] : box[3]]
            seen = (box[0] / height, box[1] / height, box[2] / width, box[3] / width)
    image = resize_gray(pixels, size)
    if "clahe" in method:
        from skimage.exposure import equalize_adapthist

        image = _to_uint8(equalize_adapthist(image, kernel_size=max(8, size // 8), clip_limit=0.01))
    elif method == "histeq":
        from skimage.exposure import equalize_hist

        image = _to_uint8(equalize_hist(image, nbins=256))
    elif method == "lung_zscore":
        image = _to_uint8(lung_zscore(image))
    return image, seen


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(values) * 255.0), 0, 255).astype(np.uint8)  # in the input precision, as before


def lung_zscore(image: np.ndarray) -> np.ndarray:
    """uint8 image -> float [0, 1]: (value - lung mean) / lung SD, from -ZSCORE_RANGE to +ZSCORE_RANGE."""
    from covidscan.explain.lung_mask import lung_mask

    values = image.astype(np.float32) / 255.0
    mask = lung_mask(values)
    inside = values[mask] if mask is not None and mask.sum() >= 64 else values.ravel()
    z = (values - float(inside.mean())) / max(float(inside.std()), 1e-3)
    return np.clip((z + ZSCORE_RANGE) / (2 * ZSCORE_RANGE), 0.0, 1.0)
