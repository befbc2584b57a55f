"""NIfTI volumes, read safely: the header is checked before any voxel is allocated.

A volume is read once in its stored dtype (an int16 CT stays int16), oriented
lazily (flips and transposes are numpy views) and turned into float slices one
at a time, so memory is the stored data plus one slice, and a hostile header
(zero or negative dimensions, terabytes declared, a gzip bomb) is refused from
its first 540 bytes. Intensity statistics are computed once per volume, not per
slice.
"""
from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidscan.data.intensity import LUNG_WINDOW, finite01, window
from covidscan.errors import ImageReadError
MAX_SLICES = 1024
# Stored voxel bytes of one volume: 512 x 512 x 300 int16 (157 MB) fits, larger is refused.
MAX_UPLOAD_DATA_BYTES = 160_000_000
MAX_FILE_DATA_BYTES = 4_000_000_000  # files indexed for training: only the header-declared size is checked
STATS_SAMPLE = 2_000_000  # voxels sampled (evenly strided) for the intensity percentiles


def header_size(data: bytes) -> int:
    """sizeof_hdr of a NIfTI-1 (348) or NIfTI-2 (540) header in either byte order, else 0."""
    for order in ("little", "big"):
        size = int.from_bytes(data[:4], order)  # type: ignore[arg-type]
        if size in (348, 540):
            return size
    return 0


def _parse_header(raw: bytes, where: str) -> object:
    import nibabel as nib

    kind = nib.Nifti2Header if header_size(raw) == 540 else nib.Nifti1Header
    try:
        return kind.from_fileobj(io.BytesIO(raw[:540]), check=False)
    except Exception as exc:
        raise ImageReadError(where, f"not a readable NIfTI header ({exc})") from None


def checked_layout(header: object, where: str, max_bytes: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, stored dtype, data offset) after checking every declared size against the limits."""
    raw_dims = [int(v) for v in header["dim"]]  # type: ignore[index]
    ndim = raw_dims[0]
    if not 1 <= ndim <= 7:
        raise ImageReadError(where, f"NIfTI header declares {ndim} dimensions (expected 2 to 7)")
    shape = tuple(raw_dims[1 : ndim + 1])
    if any(d < 1 for d in shape):
        raise ImageReadError(where, f"NIfTI header declares an empty or negative dimension: shape {shape}")
    try:
        dtype = np.dtype(header.get_data_dtype())  # type: ignore[attr-defined]
    except Exception as exc:
        raise ImageReadError(where, f"unsupported NIfTI data type ({exc})") from None
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise ImageReadError(where, f"unsupported NIfTI voxel type {dtype} (expected integer or float)")
    slices = shape[2] if len(shape) > 2 else 1
    if slices > MAX_SLICES:
        raise ImageReadError(where, f"NIfTI volume of {slices} slices exceeds the limit of {MAX_SLICES}")
    stored = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if stored > max_bytes:
        raise ImageReadError(where, f"NIfTI volume of shape {shape} ({dtype}) holds {stored / 1e6:,.0f} MB; the limit is {max_bytes / 1e6:,.0f} MB")
    offset = float(header["vox_offset"])  # type: ignore[index]
    if not np.isfinite(offset) or offset > 1e9:
        raise ImageReadError(where, f"NIfTI header has an invalid data offset ({offset})")
    return shape, dtype, max(int(offset), int(header.sizeof_hdr))  # type: ignore[attr-defined]


def inflate_bounded(data: bytes, where: str, max_bytes: int, chunk: int = 1 << 24) -> bytearray:
    """gunzip a .nii.gz: the header first, then at most the bytes it declares (no gzip bomb gets further).

    Inflates into one preallocated buffer, so the volume is never in memory twice.
    """
    inflater = zlib.decompressobj(wbits=31)
    try:
        head = inflater.decompress(data, 540)
        if header_size(head) == 0:
            raise ImageReadError(where, "gzip data is not a NIfTI volume (no NIfTI header inside)")
        shape, dtype, offset = checked_layout(_parse_header(head, where), where, max_bytes)
        wanted = max(offset + int(np.prod(shape)) * dtype.itemsize, len(head))
        out = bytearray(wanted)
        out[: len(head)] = head
        filled = len(head)
        while filled < wanted and (inflater.unconsumed_tail or not inflater.eof):
            piece = inflater.decompress(inflater.unconsumed_tail, min(chunk, wanted - filled))
            if not piece:
                break
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
    except zlib.error as exc:
        raise ImageReadError(where, f"corrupt gzip data ({exc})") from None
    del out[filled:]
    return out


@dataclass
class Volume:
    """A NIfTI volume held in its stored dtype, oriented to canonical RAS by views only."""

    voxels: np.ndarray  # (x, y, slice) view, stored dtype
    slope: float
    inter: float
    bits: int
    where: str

    @property
    def slices(self) -> int:
        return int(self.voxels.shape[2])

    def _scaled(self, values: np.ndarray) -> np.ndarray:
        out = values.astype(np.float32)
        if self.slope != 1.0 or self.inter != 0.0:
            with np.errstate(over="ignore", invalid="ignore"):
                out = out * np.float32(self.slope) + np.float32(self.inter)
        return out

    def window(self) -> tuple[bool, float, float]:
        """(looks like HU, low, high): computed once for the whole volume."""
        step = max(1, int(np.ceil((self.voxels.size / STATS_SAMPLE) ** (1 / 3))))
        sample = self._scaled(self.voxels[::step, ::step, ::step])  # a strided view: no copy of the volume
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            return False, 0.0, 0.0
        low, high = np.percentile(finite, [0.5, 99.5])
        return bool(finite.min() < -500), float(low), float(high)

    def slice_pixels(self, index: int, stats: tuple[bool, float, float], ct_window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
        """One axial slice as float32 [0, 1], displayed as radiologists read it: anterior at the top, the patient's
        right on the image's left (canonical RAS turned so rows run anterior to posterior, then mirrored)."""
        values = self._scaled(np.fliplr(np.rot90(self.voxels[:, :, index])))
        hu, low, high = stats
        with np.errstate(over="ignore", invalid="ignore"):
            if hu:
                pixels = window(values, *ct_window, in_place=True)
            else:
                pixels = (values - np.float32(low)) / np.float32(high - low) if high > low else np.zeros_like(values)
        return finite01(pixels.astype(np.float32, copy=False))

    def iter_slices(self, ct_window: tuple[float, float] = LUNG_WINDOW) -> Iterator[tuple[int, np.ndarray]]:
        stats = self.window()
        for index in range(self.slices):
            yield index, self.slice_pixels(index, stats, ct_window)


def _volume(image: object, where: str) -> Volume:
    from nibabel.orientations import apply_orientation, io_orientation

    try:
        proxy = image.dataobj  # type: ignore[attr-defined]
        stored = np.asanyarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        while stored.ndim > 3:
            stored = stored[..., 0]  # 4-D and more: the first volume
        if stored.ndim == 2:
            stored = stored[..., None]
        if stored.ndim == 1:
            stored = stored[:, None, None]
        affine = np.asarray(image.affine, np.float64)  # type: ignore[attr-defined]
        if not np.isfinite(affine).all():
            raise ImageReadError(where, "NIfTI header has an invalid (non-finite) orientation matrix")
        oriented = apply_orientation(stored, io_orientation(affine)) if stored.ndim == 3 else stored
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
        bits = int(np.dtype(image.get_data_dtype()).itemsize * 8)  # type: ignore[attr-defined]
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(where, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not (np.isfinite(slope) and slope != 0.0):
        slope = 1.0
    if not np.isfinite(inter):
        inter = 0.0
    return Volume(oriented, slope, inter, bits, where)


def volume_from_bytes(data: bytes | bytearray, where: str, gz: bool, max_bytes: int = MAX_UPLOAD_DATA_BYTES) -> Volume:
    """An uploaded .nii or .nii.gz, every declared size checked before allocation."""
    import nibabel as nib

    raw = inflate_bounded(data, where, max_bytes) if gz else data
    shape, dtype, offset = checked_layout(_parse_header(raw, where), where, max_bytes)
    needed = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) < needed:
        raise ImageReadError(where, f"NIfTI data is truncated: {len(raw)} bytes, the header needs {needed}")
    kind = nib.Nifti2Image if header_size(raw) == 540 else nib.Nifti1Image
    try:
        header = kind.header_class.from_fileobj(io.BytesIO(raw[:540]), check=False)
        # A view on the uploaded bytes (no copy): the stored data is in memory once, not twice.
        stored = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape, order="F")
        image = kind(stored, header.get_best_affine(), header)
    except Exception as exc:
        raise ImageReadError(where, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    return _volume(image, where)


def load_file(path: str | Path, max_bytes: int = MAX_FILE_DATA_BYTES) -> tuple[object, tuple[int, ...]]:
    """nibabel image of a file (header checked) and its shape; voxels are not read yet."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:
        raise ImageReadError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    shape, _, _ = checked_layout(image.header, str(path), max_bytes)  # type: ignore[attr-defined]
    return image, shape


def slice_count(path: str | Path) -> int:
    """Axial slices of a NIfTI file, from its header (refuses empty or oversized volumes)."""
    _, shape = load_file(path)
    return int(shape[2]) if len(shape) > 2 else 1


def volume_from_file(path: str | Path) -> Volume:
    image, _ = load_file(path)
    return _volume(image, str(path))
