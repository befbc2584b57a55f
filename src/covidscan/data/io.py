"""Read any supported image file into float32 grayscale in [0, 1] plus metadata.

Every failure (missing, empty, truncated, not an image, decompression bomb)
raises `ImageReadError` naming the file, so callers never see a PIL traceback.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidscan.errors import ImageReadError

# Larger than any CT slice or chest X-ray (a 4k x 4k radiograph is 16 Mpx);
# a PNG that claims more is treated as a decompression bomb.
MAX_PIXELS = 60_000_000

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGE_SUFFIXES = RASTER_SUFFIXES

_BITS_BY_MODE = {"1": 1, "L": 8, "LA": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "I;16": 16, "I;16B": 16, "I;16L": 16}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's convert("L")


@dataclass
class ImageData:
    """Pixels as float32 HxW in [0, 1] and what the file said about itself."""

    pixels: np.ndarray
    meta: dict[str, object] = field(default_factory=dict)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _pil_to_gray(img: Image.Image) -> tuple[np.ndarray, int]:
    """Convert any PIL mode to float32 gray in [0, 1]; return it and the bit depth."""
    mode = img.mode
    if mode in ("RGBA", "LA", "P", "PA"):
        # Composite onto black: CT and X-ray backgrounds are black, and an opaque
        # alpha (the common case) changes nothing.
        rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
        gray = rgba[..., :3] @ _LUMA * rgba[..., 3]
        return gray.astype(np.float32), 8
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(img.convert("RGB"), np.float32) / 255.0
        return (rgb @ _LUMA).astype(np.float32), 8
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), np.float32) / 255.0, _BITS_BY_MODE[mode]
    if mode.startswith("I;16"):
        return np.asarray(img, np.float32) / 65535.0, 16
    if mode in ("I", "F"):
        # 32-bit containers usually hold 16-bit data (PNG 16-bit opens as "I").
        arr = np.asarray(img, np.float32)
        bits = 16 if arr.min() >= 0 and arr.max() <= 65535 else 32
        if bits == 16:
            return arr / 65535.0, 16
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr), 32
    raise ImageReadError(img.filename if hasattr(img, "filename") else "?", f"unsupported image mode {mode!r}")


def read_raster(path: Path, max_pixels: int = MAX_PIXELS) -> ImageData:
    """Read a PNG/JPEG/BMP/TIFF file of any PIL mode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageReadError(path, f"image of {width}x{height} px exceeds the limit of {max_pixels} px (decompression bomb?)")
                img.load()
                fmt, mode = img.format, img.mode
                pixels, bits = _pil_to_gray(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None
    meta: dict[str, object] = {
        "format": fmt,
        "mode": mode,
        "width": width,
        "height": height,
        "bit_depth": bits,
        "modality": "",
    }
    return ImageData(pixels=pixels, meta=meta)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> ImageData:
    """Read one image file of a supported format. Raises ImageReadError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type {path.suffix!r}; expected one of {sorted(IMAGE_SUFFIXES)}")
    return read_raster(path, max_pixels)


def resize_gray(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize float gray [0,1] to size x size and quantise to uint8.

    A plain (anisotropic) resize, as in the seed studies; the aspect ratio is
    recorded in the manifest so the audit can check it as a shortcut.
    """
    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)


def load_resized(path: str | Path, size: int) -> np.ndarray:
    """Read an image and return it as uint8 size x size: the training cache format."""
    return resize_gray(read_image(path).pixels, size)
