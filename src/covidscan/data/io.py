"""Read any supported image file into float32 grayscale in [0, 1] plus metadata.

Every failure (missing, empty, truncated, not an image, decompression bomb)
raises `ImageReadError` naming the file, so callers never see a PIL traceback.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidscan.errors import ImageReadError

# Larger than any CT slice or chest X-ray (a 4k x 4k radiograph is 16 Mpx);
# a PNG that claims more is treated as a decompression bomb.
MAX_PIXELS = 60_000_000

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES | frozenset(NIFTI_SUFFIXES)

# CT window for lungs (width, level) in Hounsfield units, as radiologists read them.
LUNG_WINDOW = (1500.0, -600.0)
# A fixed salt: the same patient gets the same key in every manifest, and the
# key does not reveal the DICOM PatientID it was made from.
_PATIENT_KEY_SALT = b"covidscan-patient-key-v1"

_BITS_BY_MODE = {"1": 1, "L": 8, "LA": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "I;16": 16, "I;16B": 16, "I;16L": 16}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's convert("L")


@dataclass
class ImageData:
    """Pixels as float32 HxW in [0, 1] and what the file said about itself."""

    pixels: np.ndarray
    meta: dict[str, object] = field(default_factory=dict)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image_file(path: Path) -> bool:
    return _suffix(path) in IMAGE_SUFFIXES and not path.name.startswith(".")


def is_volume_file(path: Path) -> bool:
    """Files whose slices become separate manifest rows (NIfTI volumes)."""
    return _suffix(path) in NIFTI_SUFFIXES


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


def read_raster(path: Path | BinaryIO, max_pixels: int = MAX_PIXELS, name: str | None = None) -> ImageData:
    """Read a PNG/JPEG/BMP/TIFF file (or file object) of any PIL mode."""
    where = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageReadError(where, f"image of {width}x{height} px exceeds the limit of {max_pixels} px (decompression bomb?)")
                img.load()
                fmt, mode = img.format, img.mode
                pixels, bits = _pil_to_gray(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(where, f"refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(where, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(where, f"corrupt or truncated image ({exc})") from None
    meta: dict[str, object] = {
        "format": fmt,
        "mode": mode,
        "width": width,
        "height": height,
        "bit_depth": bits,
        "modality": "",
    }
    return ImageData(pixels=pixels, meta=meta)


def window(values: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map a (width, level) window of HU values onto [0, 1]."""
    low = level - width / 2.0
    return np.clip((values - low) / width, 0.0, 1.0).astype(np.float32)


def patient_key(patient_id: str) -> str:
    """A pseudonymous, stable patient key: salted SHA-256, never the ID itself."""
    digest = hashlib.sha256(_PATIENT_KEY_SALT + patient_id.encode("utf-8")).hexdigest()
    return f"pk-{digest[:16]}"


def read_dicom(
    path: Path | BinaryIO, frame: int | None = None, ct_window: tuple[float, float] = LUNG_WINDOW, name: str | None = None
) -> ImageData:
    """Read a DICOM image: modality LUT to HU, CT window or VOI LUT, MONOCHROME1 inverted.

    Only technical fields go into the metadata; the patient becomes a salted
    hash (`patient_key`), never a name, ID or birth date.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    where = name or str(path)
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise ImageReadError(where, "DICOM file holds no pixel data")
        raw = ds.pixel_array
    except ImageReadError:
        raise
    except InvalidDicomError:
        raise ImageReadError(where, "not a valid DICOM file") from None
    except Exception as exc:  # pydicom raises many types for unsupported/corrupt pixel data
        raise ImageReadError(where, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        if frame is None or not 0 <= frame < frames:
            raise ImageReadError(where, f"multi-frame DICOM with {frames} frames needs a frame index in [0, {frames})")
        raw = raw[frame]
    if raw.ndim != 2:
        raise ImageReadError(where, f"expected a 2-D grayscale DICOM image, got shape {raw.shape}")
    modality = str(getattr(ds, "Modality", "") or "")
    values = apply_modality_lut(raw, ds).astype(np.float32)
    if modality == "CT":
        pixels = window(values, *ct_window)
    else:
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            values = apply_voi_lut(values, ds).astype(np.float32)
        low, high = float(values.min()), float(values.max())
        pixels = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = 1.0 - pixels
    meta: dict[str, object] = {
        "format": "DICOM",
        "mode": str(getattr(ds, "PhotometricInterpretation", "")),
        "width": int(raw.shape[1]),
        "height": int(raw.shape[0]),
        "bit_depth": int(getattr(ds, "BitsStored", 0) or 0),
        "modality": modality,
        "frames": frames,
    }
    if getattr(ds, "PatientID", ""):
        meta["patient_key"] = patient_key(str(ds.PatientID))
    return ImageData(pixels=pixels.astype(np.float32), meta=meta)


def nifti_slice_count(path: str | Path) -> int:
    """Number of axial slices of a NIfTI volume (reads the header only)."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as exc:
        raise ImageReadError(path, f"not a readable NIfTI file ({exc})") from None
    if len(image.shape) < 3:
        return 1
    return int(image.shape[2])


def _nifti_volume(image: object, where: str) -> np.ndarray:
    """The canonical (x, y, slice) float volume of a nibabel image."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(image)
        shape = image.shape  # type: ignore[attr-defined]
        if len(shape) == 2:
            return np.asarray(image.dataobj, np.float32)[..., None]  # type: ignore[attr-defined]
        if len(shape) in (3, 4):
            volume = np.asarray(image.dataobj, np.float32)  # type: ignore[attr-defined]
            return volume[..., 0] if volume.ndim == 4 else volume
    except Exception as exc:
        raise ImageReadError(where, f"not a readable NIfTI file ({exc})") from None
    raise ImageReadError(where, f"unsupported NIfTI shape {shape}")


def _nifti_slice(volume: np.ndarray, index: int, bits: int, where: str, ct_window: tuple[float, float] = LUNG_WINDOW) -> ImageData:
    # Canonical RAS has x to the patient's right on axis 0; rotate so rows run anterior->posterior.
    values = np.rot90(volume[:, :, index]).astype(np.float32)
    if float(volume.min()) < -500:
        pixels = window(values, *ct_window)
    else:
        low, high = np.percentile(volume, [0.5, 99.5])
        pixels = np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)
    meta: dict[str, object] = {
        "format": "NIfTI", "mode": str(volume.dtype), "width": int(values.shape[1]), "height": int(values.shape[0]),
        "bit_depth": bits, "modality": "", "frames": int(volume.shape[2]),
    }
    return ImageData(pixels=pixels.astype(np.float32), meta=meta)


def read_nifti(path: Path, frame: int | None, ct_window: tuple[float, float] = LUNG_WINDOW) -> ImageData:
    """One axial slice of a NIfTI volume (canonical RAS orientation, slices along the last axis).

    Values that look like HU (minimum below -500) get the CT window; others
    are scaled by the volume's 0.5-99.5 percentiles.
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        bits = int(np.dtype(image.get_data_dtype()).itemsize * 8)
    except Exception as exc:
        raise ImageReadError(path, f"not a readable NIfTI file ({exc})") from None
    volume = _nifti_volume(image, str(path))
    slices = volume.shape[2]
    index = 0 if frame is None and slices == 1 else frame
    if index is None or not 0 <= index < slices:
        raise ImageReadError(path, f"NIfTI volume with {slices} slices needs a slice index in [0, {slices})")
    return _nifti_slice(volume, index, bits, str(path), ct_window)


def read_image(path: str | Path, frame: int | None = None, max_pixels: int = MAX_PIXELS) -> ImageData:
    """Read one image (or one slice/frame of a volume). Raises ImageReadError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type {suffix!r}; expected one of {sorted(IMAGE_SUFFIXES)}")
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path, frame)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, frame)
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


def load_resized(path: str | Path, size: int, frame: int | None = None) -> np.ndarray:
    """Read an image and return it as uint8 size x size: the training cache format."""
    return resize_gray(read_image(path, frame).pixels, size)


MAX_UPLOAD_SLICES = 1024
MAX_UPLOAD_VOXELS = 64_000_000  # 256 MB as float32
MAX_INFLATED_BYTES = 1_000_000_000  # a gzip'ed NIfTI may not inflate beyond this (gzip bomb)


def _nifti_header_size(data: bytes) -> int:
    """sizeof_hdr of a NIfTI-1 (348) or NIfTI-2 (540) header in either byte order, else 0."""
    for order in ("little", "big"):
        size = int.from_bytes(data[:4], order)  # type: ignore[arg-type]
        if size in (348, 540):
            return size
    return 0


def sniff_kind(data: bytes) -> str:
    """'dicom', 'nifti', 'nifti.gz' or 'raster', from the bytes themselves (never a user-given name)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == b"\x1f\x8b":
        return "nifti.gz"
    if len(data) >= 348 and _nifti_header_size(data) in (348, 540):
        return "nifti"
    return "raster"


def _gunzip(data: bytes, where: str) -> bytes:
    import zlib

    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise ImageReadError(where, f"corrupt gzip data ({exc})") from None
    if inflater.unconsumed_tail:
        raise ImageReadError(where, f"gzip data inflates beyond {MAX_INFLATED_BYTES} bytes (decompression bomb?)")
    return out


def read_image_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> list[ImageData]:
    """Every slice/frame of an uploaded file, read in memory and recognised by content.

    PNG/JPEG/BMP/TIFF give one image; a multi-frame DICOM or a NIfTI volume
    gives one per slice. Errors name `name` (for messages only; never a path).
    """
    import io

    if not data:
        raise ImageReadError(name, "file is empty (0 bytes)")
    kind = sniff_kind(data)
    if kind == "dicom":
        import pydicom

        try:
            frames = int(getattr(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), "NumberOfFrames", 1) or 1)
        except Exception:
            raise ImageReadError(name, "not a valid DICOM file") from None
        if frames > MAX_UPLOAD_SLICES:
            raise ImageReadError(name, f"DICOM with {frames} frames exceeds the limit of {MAX_UPLOAD_SLICES}")
        return [read_dicom(io.BytesIO(data), i if frames > 1 else None, name=name) for i in range(frames)]
    if kind in ("nifti", "nifti.gz"):
        import nibabel as nib

        raw = _gunzip(data, name) if kind == "nifti.gz" else data
        try:
            image = (nib.Nifti2Image if _nifti_header_size(raw) == 540 else nib.Nifti1Image).from_bytes(raw)
            bits = int(np.dtype(image.get_data_dtype()).itemsize * 8)
        except Exception as exc:
            raise ImageReadError(name, f"not a readable NIfTI file ({exc})") from None
        volume = _nifti_volume(image, name)
        if volume.shape[2] > MAX_UPLOAD_SLICES or volume.size > MAX_UPLOAD_VOXELS:
            raise ImageReadError(name, f"NIfTI volume of shape {volume.shape} exceeds the upload limits")
        return [_nifti_slice(volume, i, bits, name) for i in range(volume.shape[2])]
    return [read_raster(io.BytesIO(data), max_pixels, name=name)]
