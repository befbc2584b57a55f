"""Read any supported image file into float32 grayscale in [0, 1] plus metadata.

Every failure (missing, empty, truncated, not an image, decompression bomb)
raises `ImageReadError` naming the file, so callers never see a PIL traceback.
"""
from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covidscan.data import nifti
from covidscan.data.intensity import LUNG_WINDOW, finite01, window
from covidscan.data.pseudonym import patient_key
from covidscan.errors import ImageReadError, exception_summary

# Larger than any CT slice or chest X-ray (a 4k x 4k radiograph is 16 Mpx);
# a PNG that claims more is treated as a decompression bomb.
MAX_PIXELS = 60_000_000

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES | frozenset(NIFTI_SUFFIXES)

# Uploads to the service: a 4472 x 4472 radiograph fits; larger is refused before decoding,
# which bounds one image's memory (a 19.4 Mpx RGBA PNG peaked at +257 MB: bench/hostile_service.py).
MAX_UPLOAD_PIXELS = 20_000_000
# Stored pixel bytes of one DICOM upload (all frames): 300 frames of 512 x 512 x 16 bit fit.
MAX_DICOM_PIXEL_BYTES = 160_000_000
_BAND_ROWS = 512  # colour images are converted to gray in bands of rows, never whole in float

_BITS_BY_MODE = {"1": 1, "L": 8, "LA": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "I;16": 16, "I;16B": 16, "I;16L": 16}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's convert("L")


@dataclass
class ImageData:
    """Pixels as float32 HxW in [0, 1] and what the file said about itself."""

    pixels: np.ndarray
    meta: dict[str, object] = field(default_factory=dict)
    hu: np.ndarray | None = None  # CT DICOM read with keep_hu: the frame in HU (viewers window it themselves)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def has_dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file by its content ('DICM' after the 128-byte preamble): PACS exports often have no extension."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """A .dcm/.dicom file, or a file of any other non-image name whose content is DICOM (not a DICOMDIR index)."""
    suffix = _suffix(path)
    if suffix in DICOM_SUFFIXES:
        return True
    return suffix not in IMAGE_SUFFIXES and path.name.upper() != "DICOMDIR" and has_dicom_preamble(path)


def is_image_file(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return _suffix(path) in IMAGE_SUFFIXES or is_dicom_file(path)


def is_volume_file(path: Path) -> bool:
    """Files whose slices become separate manifest rows (NIfTI volumes)."""
    return _suffix(path) in NIFTI_SUFFIXES


def _band_to_gray(img: Image.Image, value_range: tuple[float, float] | None) -> np.ndarray:
    """Float32 gray in [0, 1] of one band of rows, any PIL mode."""
    mode = img.mode
    if mode in ("RGBA", "LA", "P", "PA"):
        # Composite onto black: CT and X-ray backgrounds are black, and an opaque
        # alpha (the common case) changes nothing.
        rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
        return (rgba[..., :3] @ _LUMA * rgba[..., 3]).astype(np.float32)
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(img.convert("RGB"), np.float32) / 255.0
        return (rgb @ _LUMA).astype(np.float32)
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), np.float32) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(img, np.float32) / 65535.0
    arr = np.asarray(img, np.float32)  # "I" or "F"
    lo, hi = value_range or (0.0, 65535.0)
    with np.errstate(over="ignore", invalid="ignore"):
        return (arr - np.float32(lo)) / np.float32(hi - lo) if hi > lo else np.zeros_like(arr)


def _pil_to_gray(img: Image.Image) -> tuple[np.ndarray, int]:
    """Convert any PIL mode to float32 gray in [0, 1], band by band; return it and the bit depth."""
    mode = img.mode
    if mode not in _BITS_BY_MODE and mode not in ("PA", "YCbCr", "LAB", "HSV", "I", "F"):
        raise ImageReadError(img.filename if hasattr(img, "filename") else "?", f"unsupported image mode {mode!r}")
    bits, value_range = _BITS_BY_MODE.get(mode, 8), None
    if mode in ("I", "F"):
        # 32-bit containers usually hold 16-bit data (PNG 16-bit opens as "I").
        lo, hi = (float(v) for v in img.getextrema())  # type: ignore[misc]
        finite = np.isfinite(lo) and np.isfinite(hi)
        bits = 16 if finite and lo >= 0 and hi <= 65535 else 32
        value_range = (0.0, 65535.0) if bits == 16 else ((lo, hi) if finite else (0.0, 0.0))
    width, height = img.size
    gray = np.empty((height, width), np.float32)
    for top in range(0, height, _BAND_ROWS):
        bottom = min(height, top + _BAND_ROWS)
        band = img if (top, bottom) == (0, height) else img.crop((0, top, width, bottom))
        gray[top:bottom] = _band_to_gray(band, value_range)
    return finite01(gray), bits


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
                # Cameras and phones store photos sideways plus an EXIF tag (exif_transpose copies: only when needed).
                upright = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) not in (0, 1) else img
                pixels, bits = _pil_to_gray(upright)
                height, width = pixels.shape
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


_DEFLATED = "1.2.840.10008.1.2.1.99"
_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00")  # file meta or identifying group first: DICOM without preamble
_DEFLATED_HEAD_BYTES = 4_000_000  # elements before the pixel data of a deflated DICOM (more is refused)


def _dicom_dataset(data: bytes, where: str) -> object:
    """Parse DICOM bytes (with or without the 128-byte preamble); a deflated body inflates only up to the limits."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_dataset

    try:
        meta, offset = _file_meta(data)
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        # Inflate the elements before the pixel data first, check the sizes they declare, then inflate only that much.
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = inflater.decompress(data[offset:], _DEFLATED_HEAD_BYTES)
        header = read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag == 0x7FE00010)
        needed = _declared_pixel_bytes(header, where, MAX_PIXELS)
        rest = inflater.decompress(inflater.unconsumed_tail, needed + _DEFLATED_HEAD_BYTES)
        if inflater.unconsumed_tail:
            raise ImageReadError(where, "deflated DICOM inflates beyond the size its header declares (decompression bomb?)")
        ds = read_dataset(io.BytesIO(head + rest), False, True)
        ds.file_meta = pydicom.dataset.FileMetaDataset(meta)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        return ds
    except ImageReadError:
        raise
    except (InvalidDicomError, zlib.error):
        raise ImageReadError(where, "not a valid DICOM file") from None
    except Exception as exc:
        raise ImageReadError(where, f"not a readable DICOM file ({exception_summary(exc)})") from None


def _dicom_int(ds: object, keyword: str, default: int, where: str) -> int:
    value = getattr(ds, keyword, None)
    if value in (None, ""):
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ImageReadError(where, f"DICOM {keyword} is not a number ({str(value)[:20]!r})") from None


def _declared_pixel_bytes(ds: object, where: str, max_pixels: int) -> int:
    """Stored pixel bytes the header declares, after checking every size against the limits."""
    rows, columns = _dicom_int(ds, "Rows", 0, where), _dicom_int(ds, "Columns", 0, where)
    frames = max(_dicom_int(ds, "NumberOfFrames", 1, where), 1)
    samples = max(_dicom_int(ds, "SamplesPerPixel", 1, where), 1)
    bits = _dicom_int(ds, "BitsAllocated", 16, where)
    if rows < 1 or columns < 1:
        raise ImageReadError(where, f"DICOM declares an empty image ({rows} x {columns})")
    if samples != 1:
        raise ImageReadError(where, f"expected a grayscale DICOM image, got {samples} samples per pixel")
    if rows * columns > max_pixels:
        raise ImageReadError(where, f"DICOM image of {columns}x{rows} px exceeds the limit of {max_pixels} px")
    stored = rows * columns * frames * max(bits, 8) // 8
    if stored > MAX_DICOM_PIXEL_BYTES:
        raise ImageReadError(where, f"DICOM pixel data of {frames} frame(s) of {columns}x{rows} px ({stored / 1e6:,.0f} MB) "
                                    f"exceeds the limit of {MAX_DICOM_PIXEL_BYTES / 1e6:.0f} MB")
    return stored


def _dicom_frames(ds: object, where: str, max_pixels: int) -> np.ndarray:
    """Decoded stored values, (frames, rows, columns), after checking every declared size against the limits."""
    if "PixelData" not in ds:  # type: ignore[operator]
        raise ImageReadError(where, "DICOM file holds no pixel data")
    _declared_pixel_bytes(ds, where, max_pixels)
    rows, columns = int(ds.Rows), int(ds.Columns)  # type: ignore[attr-defined]
    try:
        raw = np.asarray(ds.pixel_array)  # type: ignore[attr-defined]
    except Exception as exc:  # pydicom raises many types for unsupported/corrupt pixel data
        raise ImageReadError(where, f"cannot decode DICOM pixel data ({exception_summary(exc)})") from None
    raw = raw[None] if raw.ndim == 2 else raw
    if raw.ndim != 3 or raw.shape[1:] != (rows, columns):
        raise ImageReadError(where, f"expected 2-D grayscale DICOM frames, got shape {raw.shape}")
    return raw


def _float_attr(ds: object, keyword: str, default: float) -> float:
    try:
        value = float(getattr(ds, keyword, default))
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default


def _modality_values(ds: object, raw: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (HU for CT), float32."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:  # type: ignore[operator]
        return apply_modality_lut(raw, ds).astype(np.float32)
    values = raw.astype(np.float32)  # the common rescale: float32 arithmetic, no float64 copy of a large image
    values *= np.float32(_float_attr(ds, "RescaleSlope", 1.0))
    values += np.float32(_float_attr(ds, "RescaleIntercept", 0.0))
    return values


def is_ct(ds: object) -> bool:
    return str(getattr(ds, "Modality", "") or "") == "CT"


# DICOM Modality (0008,0060) -> the family a model is trained on: CT slices or chest radiographs
# (CR computed, DX digital radiography). Anything else (MR, US, OT, SC, ...) has no family: ''.
MODALITY_FAMILY = {"CT": "CT", "CR": "CXR", "DX": "CXR"}


def quiet_pydicom() -> None:
    """pydicom's value validation warns with the offending value in the text ("Invalid value for VR DA: '1901-02-03'"),
    which would put patient fields into a log; services read values as they are instead (each is checked where it is
    used). Process-wide: called by the DICOM node and the web service at start."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def modality_family(dicom_modality: object) -> str:
    """'CT', 'CXR' or '' for a DICOM Modality value."""
    return MODALITY_FAMILY.get(str(dicom_modality or "").strip().upper(), "")


def routing_modality(dicom_modality: object) -> str:
    """What routing needs of a DICOM Modality value: its family ('CT', 'CXR'), the tag itself for every other modality
    ('MR', 'US', 'OT', ...: no model is trained on it, so it is refused by name, never left to a CT model's gate), or ''
    when the file has no Modality."""
    tag = str(dicom_modality or "").strip().upper()[:16]
    return MODALITY_FAMILY.get(tag, tag)


def _dicom_pixels(ds: object, values: np.ndarray, ct_window: tuple[float, float]) -> np.ndarray:
    """One frame's modality values (`_modality_values`; a CT frame is windowed in place) -> float32 [0, 1]:
    CT window or VOI LUT, MONOCHROME1 inverted, radiological orientation."""
    from pydicom.pixels import apply_voi_lut

    if is_ct(ds):
        pixels = window(values, *ct_window, in_place=True)  # no second full-size copy
    else:
        if "VOILUTSequence" in ds or "WindowCenter" in ds:  # type: ignore[operator]
            try:
                values = apply_voi_lut(values, ds).astype(np.float32)
            except Exception:  # a malformed VOI LUT or window: fall back to the full range
                pass
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            pixels = (values - np.float32(low)) / np.float32(high - low) if high > low else np.zeros_like(values)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = 1.0 - pixels
    return finite01(radiological(pixels.astype(np.float32, copy=False), ds))


def radiological(frame: np.ndarray, ds: object) -> np.ndarray:
    """An axial frame turned to the radiological display (patient right on image left, anterior at the top).

    Most scanners store axial slices that way already (ImageOrientationPatient [1, 0, 0, 0, 1, 0]); a
    series stored mirrored or transposed is flipped back here, at training and serving time alike.
    Other planes, and files without an orientation, are left as stored."""
    try:
        cosines = np.array([float(v) for v in ds.ImageOrientationPatient], float)  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return frame
    if cosines.shape != (6,) or not np.isfinite(cosines).all():
        return frame
    row, column = cosines[:3], cosines[3:]
    normal = np.cross(row, column)
    if abs(normal[2]) < max(abs(normal[0]), abs(normal[1])):
        return frame  # not axial
    if abs(row[1]) > abs(row[0]):  # columns run front to back: transpose first
        frame, row, column = frame.T, column, row
    if row[0] < 0:  # columns run toward the patient's right: mirror
        frame = frame[:, ::-1]
    if column[1] < 0:  # rows run toward the front: upside down
        frame = frame[::-1, :]
    return np.ascontiguousarray(frame)


def _dicom_meta(ds: object, shape: tuple[int, ...]) -> dict[str, object]:
    """Technical fields only; the patient becomes a keyed hash (`patient_key`), never a name, ID or birth date.
    `shape`: (frames, rows, columns)."""
    meta: dict[str, object] = {
        "format": "DICOM",
        "mode": str(getattr(ds, "PhotometricInterpretation", "")),
        "width": int(shape[2]),
        "height": int(shape[1]),
        "bit_depth": int(_float_attr(ds, "BitsStored", 0)),
        "modality": str(getattr(ds, "Modality", "") or ""),
        "frames": int(shape[0]),
    }
    if getattr(ds, "PatientID", ""):
        meta["patient_key"] = patient_key(str(ds.PatientID))  # type: ignore[attr-defined]
    return meta


def _decoded_dicom(data: bytes, where: str, max_pixels: int) -> tuple[object, np.ndarray, dict[str, object]]:
    """(data set without its encoded pixels, stored frames, metadata): one parse and one decode per file."""
    ds = _dicom_dataset(data, where)
    try:
        raw = _dicom_frames(ds, where, max_pixels)
        meta = _dicom_meta(ds, raw.shape)
    except ImageReadError:
        raise
    except Exception as exc:  # a malformed element (e.g. Rows stored in 3 bytes) raises whatever pydicom raises
        raise ImageReadError(where, f"malformed DICOM header ({exception_summary(exc)})") from None
    del ds.PixelData  # type: ignore[attr-defined]  # decoded: the encoded copy is no longer needed
    return ds, raw, meta


# Files above this size are checked for several frames, which are then decoded one at a time; below it (a CT slice is
# 0.5 MB) the check, a second header parse, would cost about 15 % of the decode and save no memory worth having.
STREAM_FRAMES_ABOVE_BYTES = 2_000_000


def iter_dicom(data: bytes, where: str, ct_window: tuple[float, float] = LUNG_WINDOW, max_pixels: int = MAX_PIXELS,
               keep_hu: bool = False) -> Iterator[ImageData]:
    """Every frame of a DICOM file, decoded once (with `keep_hu`, CT frames also in HU). A multi-frame file is
    decoded one frame at a time from its bytes (`_iter_frames`), so a 300-frame CT never holds its stored values twice."""
    header = _multi_frame_header(data) if len(data) > STREAM_FRAMES_ABOVE_BYTES else None
    if header is not None:
        yield from _iter_frames(data, header, where, ct_window, max_pixels, keep_hu)
        return
    ds, raw, meta = _decoded_dicom(data, where, max_pixels)
    for frame in raw:
        yield _frame_image(ds, frame, dict(meta), ct_window, keep_hu, where)


def _file_meta(data: bytes) -> tuple[object, int]:
    """The file meta (group 2, after the preamble if any) and the offset where the data set starts."""
    from pydicom.filereader import read_dataset, read_preamble

    stream = io.BytesIO(data)
    read_preamble(stream, True)
    meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return meta, stream.tell()


def read_dicom_header(data: bytes, where: str) -> object:
    """The data set without its pixel data; a deflated file is inflated only within the limits its header allows
    (reading it whole would inflate all of it: a decompression bomb)."""
    import pydicom

    return _dicom_dataset(data, where) if is_deflated_dicom(data) else pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def is_deflated_dicom(data: bytes) -> bool:
    """Whether the file's meta says Deflated Explicit VR (reads the preamble and group 2 only)."""
    try:
        return str(_file_meta(data)[0].get("TransferSyntaxUID", "")) == _DEFLATED  # type: ignore[attr-defined]
    except Exception:
        return False


def _multi_frame_header(data: bytes) -> object | None:
    """The header (no pixel data read) of an uncompressed-or-encapsulated multi-frame file, else None (single frames
    and deflated files take the whole-file path)."""
    import pydicom

    if is_deflated_dicom(data):
        return None  # read_dicom_header would inflate it; the whole-file path reads it within the limits
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        frames = int(header.get("NumberOfFrames") or 1)
        syntax = str(header.file_meta.get("TransferSyntaxUID", "")) if hasattr(header, "file_meta") else ""
    except Exception:
        return None  # the whole-file path reports what is wrong
    return header if frames > 1 and syntax else None


def _iter_frames(data: bytes, header: object, where: str, ct_window: tuple[float, float], max_pixels: int, keep_hu: bool
                 ) -> Iterator[ImageData]:
    from pydicom.pixels import iter_pixels

    try:
        _declared_pixel_bytes(header, where, max_pixels)
        rows, columns, frames = int(header.Rows), int(header.Columns), int(header.NumberOfFrames)  # type: ignore[attr-defined]
        meta = _dicom_meta(header, (frames, rows, columns))
        decoded = iter_pixels(io.BytesIO(data))
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(where, f"malformed DICOM header ({exception_summary(exc)})") from None
    produced = 0
    while True:
        try:
            frame = next(decoded, None)
        except Exception as exc:  # pydicom raises many types for unsupported/corrupt pixel data
            raise ImageReadError(where, f"cannot decode DICOM pixel data of frame {produced + 1} ({exception_summary(exc)})") from None
        if frame is None:
            break
        if frame.shape != (rows, columns):
            raise ImageReadError(where, f"expected 2-D grayscale DICOM frames of {columns}x{rows}, got shape {frame.shape}")
        produced += 1
        yield _frame_image(header, frame, dict(meta), ct_window, keep_hu, where)
    if produced == 0:
        raise ImageReadError(where, "DICOM file holds no pixel data")


def _frame_image(ds: object, frame: np.ndarray, meta: dict[str, object], ct_window: tuple[float, float], keep_hu: bool,
                 where: str) -> ImageData:
    """One stored frame -> the model's gray image (and HU for CT with `keep_hu`); ImageReadError for malformed LUTs."""
    try:
        values = _modality_values(ds, frame)
        hu = radiological(values.copy(), ds) if keep_hu and is_ct(ds) else None  # a copy: the window works in place
        return ImageData(pixels=_dicom_pixels(ds, values, ct_window), meta=meta, hu=hu)
    except Exception as exc:  # e.g. a Modality LUT without its descriptor: pydicom raises AttributeError
        raise ImageReadError(where, f"cannot convert the stored values ({exception_summary(exc)})") from None


def read_dicom(
    path: Path | BinaryIO, frame: int | None = None, ct_window: tuple[float, float] = LUNG_WINDOW, name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> ImageData:
    """Read one frame of a DICOM image (see `_dicom_pixels`); a multi-frame file needs `frame`."""
    where = name or str(path)
    data = path.read() if hasattr(path, "read") else Path(path).read_bytes()  # type: ignore[union-attr,arg-type]
    ds, raw, meta = _decoded_dicom(data, where, max_pixels)
    frames = raw.shape[0]
    if frames > 1 and (frame is None or not 0 <= frame < frames):
        raise ImageReadError(where, f"multi-frame DICOM with {frames} frames needs a frame index in [0, {frames})")
    return _frame_image(ds, raw[frame or 0], meta, ct_window, False, where)


def nifti_slice_count(path: str | Path) -> int:
    """Number of axial slices of a NIfTI volume (reads the header only; refuses empty or oversized volumes)."""
    return nifti.slice_count(path)


def read_nifti(path: Path, frame: int | None, ct_window: tuple[float, float] = LUNG_WINDOW) -> ImageData:
    """One axial slice of a NIfTI volume (canonical RAS orientation, slices along the last axis).

    Values that look like HU (minimum below -500) get the CT window; others
    are scaled by the volume's 0.5-99.5 percentiles.
    """
    stat = Path(path).stat()
    volume, stats = _cached_volume(str(path), stat.st_mtime_ns, stat.st_size)
    index = 0 if frame is None and volume.slices == 1 else frame
    if index is None or not 0 <= index < volume.slices:
        raise ImageReadError(path, f"NIfTI volume with {volume.slices} slices needs a slice index in [0, {volume.slices})")
    return _nifti_image(volume, volume.slice_pixels(index, stats, ct_window))


@lru_cache(maxsize=2)
def _cached_volume(path: str, mtime_ns: int, size: int) -> tuple[nifti.Volume, tuple[bool, float, float]]:
    """Manifests list a volume's slices in a row: read and measure it once, not once per slice (keyed on mtime and size)."""
    volume = nifti.volume_from_file(path)
    return volume, volume.window()


def _nifti_image(volume: nifti.Volume, pixels: np.ndarray) -> ImageData:
    meta: dict[str, object] = {
        "format": "NIfTI", "mode": str(volume.voxels.dtype), "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
        "bit_depth": volume.bits, "modality": "", "frames": volume.slices,
    }
    return ImageData(pixels=pixels, meta=meta)


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
    if is_dicom_file(path):
        return read_dicom(path, frame)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type {suffix!r}; expected one of {sorted(IMAGE_SUFFIXES)} or DICOM content")
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, frame)
    return read_raster(path, max_pixels)


def resize_gray(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize float gray [0,1] to size x size and quantise to uint8.

    A plain (anisotropic) resize, as in the seed studies; the aspect ratio is
    recorded in the manifest so the audit can check it as a shortcut.
    """
    img = Image.fromarray(np.asarray(pixels, np.float32), mode="F")  # asarray: no extra copy of a float32 image
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)


def load_resized(path: str | Path, size: int, frame: int | None = None, preprocess: str = "none") -> np.ndarray:
    """Read an image and return it as uint8 size x size, preprocessed as the model card says: the training cache format."""
    from covidscan.data.preprocess import prepare_image

    return prepare_image(read_image(path, frame).pixels, size, preprocess)


def load_image_array(
    refs: Sequence[tuple[str, int | None]], size: int, description: str = "loading images", show: bool = True, preprocess: str = "none"
) -> np.ndarray:
    """Read and prepare images (path, slice index) into one uint8 array (N, 1, size, size)."""
    from covidscan.progress import track

    out = np.empty((len(refs), 1, size, size), np.uint8)
    for i, (path, slice_index) in enumerate(track(refs, description, show)):
        out[i, 0] = load_resized(path, size, slice_index, preprocess)
    return out


def sniff_kind(data: bytes) -> str:
    """'dicom', 'nifti', 'nifti.gz' or 'raster', from the bytes themselves (never a user-given name)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:2] in _DICOM_GROUPS and len(data) >= 8 and data[4:6].isalpha() and data[4:6].isupper():
        return "dicom"  # no preamble: a data set that starts with an explicit-VR element of group 0002/0008
    if data[:2] == b"\x1f\x8b":
        return "nifti.gz"
    if len(data) >= 348 and nifti.header_size(data) in (348, 540):
        return "nifti"
    return "raster"


def iter_image_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_UPLOAD_PIXELS, keep_hu: bool = False) -> Iterator[ImageData]:
    """Every slice/frame of an uploaded file, read in memory, recognised by content, decoded lazily.

    PNG/JPEG/BMP/TIFF give one image; a multi-frame DICOM or a NIfTI volume
    gives one per slice, each built only when the caller asks for it, so a
    caller that resizes as it goes holds one full-size slice at a time. Every
    declared size is checked before memory is allocated. Errors name `name`
    (for messages only; never a path).
    """
    if not data:
        raise ImageReadError(name, "file is empty (0 bytes)")
    kind = sniff_kind(data)
    if kind == "dicom":
        yield from iter_dicom(data, name, max_pixels=max_pixels, keep_hu=keep_hu)
    elif kind in ("nifti", "nifti.gz"):
        volume = nifti.volume_from_bytes(data, name, gz=kind == "nifti.gz")
        if volume.voxels.shape[0] * volume.voxels.shape[1] > max_pixels:
            raise ImageReadError(name, f"NIfTI slices of {volume.voxels.shape[:2]} exceed the limit of {max_pixels} px")
        for _, pixels in volume.iter_slices():
            yield _nifti_image(volume, pixels)
    else:
        yield read_raster(io.BytesIO(data), max_pixels, name=name)


def read_image_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_UPLOAD_PIXELS) -> list[ImageData]:
    """All of `iter_image_bytes` at once (small files; the service streams instead)."""
    return list(iter_image_bytes(data, name, max_pixels))
