"""A corpus of hostile and careless uploads for the service, generated in memory.

Used by `tests/test_hostile.py` (scale "ci": small enough for the test suite)
and `bench/hostile_service.py` (scale "full": the sizes of the original
reports, for the before/after memory and time table). Only numpy, Pillow,
nibabel and pydicom are used, so the corpus runs against any version of the
service, old or new.
"""
from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PNG, JPEG, DICOM, GZIP, OCTET = "image/png", "image/jpeg", "application/dicom", "application/gzip", "application/octet-stream"
FileSpec = tuple[str, bytes, str]


@dataclass
class Case:
    """One request: files, query string, headers; `expect` lists the acceptable status codes."""

    name: str
    files: list[FileSpec]
    expect: tuple[int, ...]
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    locked: bool = False  # send to the service started with an API key ("s3cret")
    field_name: str = "files"


# ---------------------------------------------------------------------------- raster images
def png(array: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", **save)
    return buffer.getvalue()


def image_bytes(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def chest(size: int = 64, seed: int = 0) -> np.ndarray:
    """A CT-like uint8 slice: dark lungs in a bright body on black (the gate may still refuse it)."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (x**2 / 0.8 + y**2 / 0.5) < 1
    lungs = (((x - 0.35) ** 2 / 0.06 + y**2 / 0.15) < 1) | (((x + 0.35) ** 2 / 0.06 + y**2 / 0.15) < 1)
    rng = np.random.default_rng(seed)
    image = np.where(body, 170, 0) - np.where(lungs, 140, 0) + rng.integers(0, 12, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, color_type: int = 0, payload: bytes | None = None) -> bytes:
    """A PNG whose header declares width x height; IDAT is the deflated payload (default: rows of zeros)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    if payload is None:
        compressor = zlib.compressobj(9)
        row = b"\0" * (1 + width * channels)
        parts = [compressor.compress(row) for _ in range(height)]
        payload = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", payload) + _chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(image_bytes(Image.fromarray(chest(16)), "JPEG"))
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    image = Image.fromarray(np.rot90(chest(64), 1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(image, "JPEG", exif=exif.tobytes())


# ---------------------------------------------------------------------------- NIfTI
def nifti(volume: np.ndarray, gz: bool = False, patch: Callable[[bytearray], None] | None = None) -> bytes:
    import nibabel as nib

    data = bytearray(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    if patch is not None:
        patch(data)
    raw = bytes(data)
    return gzip.compress(raw, 6) if gz else raw


def dims(*values: int) -> Callable[[bytearray], None]:
    """Patch the header's dim[0..7] (dim[0] = number of dimensions)."""
    full = list(values) + [1] * (8 - len(values))

    def patch(header: bytearray) -> None:
        struct.pack_into("<8h", header, 40, *full)

    return patch


def field_patch(offset: int, fmt: str, value: float | int) -> Callable[[bytearray], None]:
    def patch(header: bytearray) -> None:
        struct.pack_into(fmt, header, offset, value)

    return patch


def datatype(code: int, bitpix: int) -> Callable[[bytearray], None]:
    def patch(header: bytearray) -> None:
        struct.pack_into("<hh", header, 70, code, bitpix)

    return patch


def ct_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """HU-like int16 volume with a chest-like pattern on every slice."""
    size, _, slices = shape
    base = chest(size, seed).astype(np.float32)
    hu = -1350.0 + base / 255.0 * 1500.0
    return np.repeat(hu[:, :, None], slices, axis=2)[: shape[0], : shape[1]].astype(np.int16)


def gzip_bomb(inflated_bytes: int, prefix: bytes = b"") -> bytes:
    """gzip of `prefix` + zeros; compresses about 1000:1."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as handle:
        handle.write(prefix)
        zeros = b"\0" * (1 << 20)
        left = inflated_bytes - len(prefix)
        while left > 0:
            handle.write(zeros[: min(left, len(zeros))])
            left -= len(zeros)
    return out.getvalue()


def nifti_bomb(shape: tuple[int, ...], code: int = 4, bitpix: int = 16) -> bytes:
    """A gzip'ed NIfTI whose (zero) data really is as large as its header says."""
    import nibabel as nib

    header = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_bytes()[:352])
    dims(len(shape), *shape)(header)
    datatype(code, bitpix)(header)
    voxels = int(np.prod(shape))
    return gzip_bomb(352 + voxels * bitpix // 8, bytes(header))


# ---------------------------------------------------------------------------- DICOM
def dicom(
    pixels: np.ndarray | None = None,
    modality: str = "CT",
    syntax: str = "1.2.840.10008.1.2.1",
    preamble: bool = True,
    edit: Callable[[object], None] | None = None,
    compress_rle: bool = False,
    replace: tuple[bytes, bytes] | None = None,
) -> bytes:
    """An in-memory DICOM (explicit VR little endian by default); `edit(ds)` changes anything after."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, RLELossless, UID, generate_uid

    stored = ct_volume((64, 64, 1))[:, :, 0] + 1024 if pixels is None else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    # a fixed UID: a random one could contain a `replace` sentinel such as "9876" (it once did, in CI)
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["covidscan hostile corpus"])
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Hostile^Patient", "MRN-12345678", "19700101"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.ascontiguousarray(stored).astype(np.int16).tobytes()
    if compress_rle:
        meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        ds.compress(RLELossless, encoding_plugin="pydicom")
    if edit is not None:
        edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if replace is not None:  # values pydicom refuses to write: write a sentinel, then swap the bytes
        assert data.count(replace[0]) == 1 and len(replace[0]) == len(replace[1])
        data = data.replace(*replace)
    return data if preamble else data[132:]


def dicom_deflate_bomb(side: int) -> bytes:
    """A deflated DICOM of side x side int16 zeros: a few hundred kB that inflate to 2*side^2 bytes."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    header = dicom(np.zeros((2, 2), np.int16))
    ds = dcmread(io.BytesIO(header))
    ds.Rows = ds.Columns = side
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 2 * side * side)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(body.getvalue() + element)]
    zeros = b"\0" * (1 << 20)
    left = 2 * side * side
    while left > 0:
        parts.append(compressor.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(compressor.flush())
    meta_buffer = DicomBytesIO()
    meta_buffer.is_little_endian, meta_buffer.is_implicit_VR = True, False
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    write_file_meta_info(meta_buffer, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta_buffer.getvalue() + b"".join(parts)


def _set(**values: object) -> Callable[[object], None]:
    def edit(ds: object) -> None:
        for key, value in values.items():
            setattr(ds, key, value)

    return edit


def _jpeg_lossless_garbage(ds: object) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # type: ignore[attr-defined]
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3garbage-not-a-jpeg\xff\xd9"])  # type: ignore[attr-defined]
    ds["PixelData"].VR = "OB"  # type: ignore[index]
    ds["PixelData"].is_undefined_length = True  # type: ignore[index]


def _drop_pixels(ds: object) -> None:
    del ds.PixelData  # type: ignore[attr-defined]


def _truncate_pixels(ds: object) -> None:
    ds.PixelData = ds.PixelData[:100]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- the corpus
def cases(scale: str = "ci") -> Iterator[Case]:
    """Every case; `scale` "full" uses the sizes of the original reports (GB-scale bombs)."""
    full = scale == "full"
    good = png(chest(64))
    ok_or_gate = (200, 422)  # answered: a prediction, or refused by the input gate

    def one(name: str, data: bytes, expect: tuple[int, ...], filename: str = "upload", ctype: str = OCTET, **kw: object) -> Case:
        return Case(name, [(filename, data, ctype)], expect, **kw)  # type: ignore[arg-type]

    # --- not images at all
    rng = np.random.default_rng(7)
    yield one("empty file", b"", (422,))
    yield one("one byte", b"\x00", (415,))
    for n in (16, 4096, 1 << 20):
        yield one(f"random bytes {n}", rng.integers(0, 256, n, dtype=np.uint8).tobytes(), (415, 422))
    yield one("zeros 1 MB", b"\0" * (1 << 20), (415, 422))
    yield one("text", b"hello, not an image\n" * 50, (415,), "x.png", PNG)
    yield one("html", b"<html><script>alert(1)</script></html>", (415,), "x.html", "text/html")
    yield one("json", b'{"image": "none"}', (415,), "x.json", "application/json")
    yield one("pdf", b"%PDF-1.4\n" + b"0" * 500, (415,), "x.pdf", "application/pdf")
    yield one("elf", b"\x7fELF" + b"\0" * 200, (415,))
    yield one("zip", b"PK\x03\x04" + b"\0" * 200, (422,), "x.zip", "application/zip")  # zips of DICOM folders are studies: a broken one is unreadable
    yield one("webp", b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\0" * 40, (415,))
    # --- zips of studies (issue 30): checked from their directory, members inflated one at a time, never past what they declare
    yield one("zip member declares 300 MB", zip_declaring(300_000_000), (422,), "x.zip", "application/zip")
    yield one("zip of zeros over the per-file limit", zeros_zip(300_000_000 if full else 257_000_000, 1), (422,), "x.zip", "application/zip")
    yield one("zip of many zero members", zeros_zip(950_000, 2048 if full else 64), (200, 415, 422), "x.zip", "application/zip")
    yield one("zip member lying about its size", zip_declaring(40), (422,), "x.zip", "application/zip")
    yield one("zip of a dicom and a text file", zip_of({"S/IM1": dicom(), "S/notes.txt": b"a note"}), ok_or_gate, "x.zip", "application/zip")
    yield one("zip of a dicom tagged US", zip_of({"S/IM1": dicom(modality="US")}), ok_or_gate, "x.zip", "application/zip")
    yield one("gzip of text", gzip.compress(b"not a volume " * 100), (415, 422), "x.nii.gz", GZIP)
    yield one("gzip bomb of zeros", gzip_bomb((2 << 30) if full else (64 << 20)), (413, 415, 422), "x.nii.gz", GZIP)
    yield one("gzip of a png", gzip.compress(good), (415, 422), "x.nii.gz", GZIP)
    yield one("gzip truncated", gzip.compress(nifti(ct_volume((32, 32, 4))))[:200], (422,), "x.nii.gz", GZIP)
    yield one("gzip garbage", b"\x1f\x8b\x08\x00garbage-not-gzip", (422,), "x.nii.gz", GZIP)
    for magic in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF8"):
        yield one(f"magic only {magic[:4]!r}", magic, (415, 422))
        yield one(f"magic + garbage {magic[:4]!r}", magic + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), (415, 422))

    # --- raster images
    yield one("good png", good, ok_or_gate, "ok.png", PNG)
    yield one("png 1x1", png(np.zeros((1, 1), np.uint8)), ok_or_gate, "x.png", PNG)
    yield one("png 1x4000", png(np.zeros((1, 4000), np.uint8)), ok_or_gate, "x.png", PNG)
    yield one("png 4000x1", png(np.zeros((4000, 1), np.uint8)), ok_or_gate, "x.png", PNG)
    yield one("png 16-bit", png((chest(64).astype(np.uint16) * 257)), ok_or_gate, "x.png", PNG)
    yield one("png palette", image_bytes(Image.fromarray(chest(64)).convert("P"), "PNG"), ok_or_gate, "x.png", PNG)
    yield one("png LA", image_bytes(Image.fromarray(chest(64)).convert("LA"), "PNG"), ok_or_gate, "x.png", PNG)
    yield one("png 1-bit", image_bytes(Image.fromarray(chest(64)).convert("1"), "PNG"), ok_or_gate, "x.png", PNG)
    yield one("png RGBA transparent", png(np.zeros((64, 64, 4), np.uint8)), ok_or_gate, "x.png", PNG)
    yield one("png truncated", good[: len(good) // 2], (422,), "x.png", PNG)
    yield one("png header only", good[:33], (422,), "x.png", PNG)
    corrupt = bytearray(good)
    corrupt[40:60] = b"\xff" * 20
    yield one("png corrupt IDAT", bytes(corrupt), (422,), "x.png", PNG)
    yield one("png bomb L 9000x9000", png_declaring(9000, 9000, 0), (413, 422), "x.png", PNG)
    rgba_side = 7745 if full else 5200
    yield one(f"png bomb RGBA {rgba_side}x{rgba_side}", png_declaring(rgba_side, rgba_side, 6), (413, 422), "x.png", PNG)
    yield one("png declares 65535x65535 with no data", png_declaring(65535, 65535, 0, payload=b"x"), (413, 422), "x.png", PNG)
    yield one("png declares 0x0", png_declaring(0, 0, 0, payload=zlib.compress(b"")), (422,), "x.png", PNG)
    ztxt = _chunk(b"zTXt", b"bomb\0\0" + zlib.compress(b"A" * (8 << 20), 9))
    yield one("png zTXt text bomb", good[:33] + ztxt + good[33:], ok_or_gate + (422,), "x.png", PNG)
    yield one("jpeg", image_bytes(Image.fromarray(chest(64)), "JPEG"), ok_or_gate, "x.jpg", JPEG)
    yield one("jpeg progressive", image_bytes(Image.fromarray(chest(64)), "JPEG", progressive=True), ok_or_gate, "x.jpg", JPEG)
    yield one("jpeg CMYK", image_bytes(Image.fromarray(chest(64)).convert("CMYK"), "JPEG"), ok_or_gate, "x.jpg", JPEG)
    yield one("jpeg EXIF rotated", exif_rotated_jpeg(), ok_or_gate, "x.jpg", JPEG)
    yield one("jpeg declares 65000x65000", jpeg_declaring(65000, 65000), (413, 422), "x.jpg", JPEG)
    yield one("jpeg declares 6000x6000", jpeg_declaring(6000, 6000), (413, 422), "x.jpg", JPEG)
    yield one("jpeg truncated", image_bytes(Image.fromarray(chest(64)), "JPEG")[:300], (200, 422), "x.jpg", JPEG)
    yield one("bmp", image_bytes(Image.fromarray(chest(64)), "BMP"), ok_or_gate, "x.bmp")
    bmp = bytearray(image_bytes(Image.fromarray(chest(8)), "BMP"))
    struct.pack_into("<ii", bmp, 18, 60000, 60000)
    yield one("bmp declares 60000x60000", bytes(bmp), (413, 422), "x.bmp")
    yield one("tiff float NaN", image_bytes(Image.fromarray(np.full((32, 32), np.nan, np.float32)), "TIFF"), ok_or_gate, "x.tif")
    yield one("tiff float inf", image_bytes(Image.fromarray(np.full((32, 32), np.inf, np.float32)), "TIFF"), ok_or_gate, "x.tif")
    yield one("tiff float huge range", image_bytes(Image.fromarray(np.array([[-3e38, 3e38]] * 8, np.float32)), "TIFF"), ok_or_gate, "x.tif")
    yield one("tiff int32", image_bytes(Image.fromarray(chest(32).astype(np.int32) * 1000), "TIFF"), ok_or_gate, "x.tif")
    frames = [Image.fromarray(chest(32, s)) for s in range(3)]
    yield one("tiff multi-page", image_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:]), ok_or_gate, "x.tif")
    yield one("gif animated", image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]), ok_or_gate, "x.gif")

    # --- NIfTI
    small = ct_volume((32, 32, 4))
    yield one("nifti good", nifti(small), ok_or_gate, "v.nii")
    yield one("nifti.gz good", nifti(small, gz=True), ok_or_gate, "v.nii.gz", GZIP)
    yield one("nifti declares 4 GB", nifti(small, patch=lambda h: (dims(3, 1024, 1024, 1024)(h), datatype(16, 32)(h))), (413, 422), "v.nii")
    yield one("nifti declares 8 GB int16", nifti(small, patch=dims(3, 2048, 2048, 1024)), (413, 422), "v.nii")
    yield one("nifti.gz declares 4 GB", nifti(small, gz=True, patch=lambda h: (dims(3, 1024, 1024, 1024)(h), datatype(16, 32)(h))), (413, 422), "v.nii.gz", GZIP)
    bomb_shape = (1024, 1024, 1400) if full else (512, 512, 160)
    yield one("nifti.gz bomb of real zeros", nifti_bomb(bomb_shape), (413, 422), "v.nii.gz", GZIP)
    yield one("nifti.gz float32 bomb", nifti_bomb((512, 512, 300) if full else (256, 256, 200), 16, 32), ok_or_gate + (413,), "v.nii.gz", GZIP)
    for d in range(1, 4):
        zero = [3, 32, 32, 4]
        zero[d] = 0
        yield one(f"nifti zero dim{d}", nifti(small, patch=dims(*zero)), (422,), "v.nii")
        negative = [3, 32, 32, 4]
        negative[d] = -5
        yield one(f"nifti negative dim{d}", nifti(small, patch=dims(*negative)), (422,), "v.nii")
    yield one("nifti zero dim gz", nifti(small, gz=True, patch=dims(3, 32, 0, 4)), (422,), "v.nii.gz", GZIP)
    yield one("nifti ndim 0", nifti(small, patch=dims(0, 32, 32, 4)), (422,), "v.nii")
    yield one("nifti ndim 8", nifti(small, patch=dims(8, 32, 32, 4, 1, 1, 1, 1)), (200, 422), "v.nii")
    yield one("nifti ndim 9", nifti(small, patch=dims(9, 32, 32, 4)), (422,), "v.nii")
    yield one("nifti 2-D", nifti(small[:, :, :1], patch=dims(2, 32, 32)), ok_or_gate, "v.nii")
    yield one("nifti 4-D first volume", nifti(np.stack([small] * 3, axis=3)), ok_or_gate, "v.nii")
    yield one("nifti 4-D declares 10000 volumes", nifti(small, patch=dims(4, 32, 32, 4, 10000)), (413, 422), "v.nii")
    yield one("nifti 5-D", nifti(small[..., None, None]), (200, 422), "v.nii")
    for code, bitpix, label in ((2, 8, "uint8"), (256, 8, "int8"), (512, 16, "uint16"), (8, 32, "int32"), (768, 32, "uint32"),
                                (1024, 64, "int64"), (1280, 64, "uint64"), (16, 32, "float32"), (64, 64, "float64"), (32, 64, "complex64"),
                                (128, 24, "rgb24"), (2304, 32, "rgba32"), (1536, 128, "float128"), (9999, 16, "unknown"), (0, 0, "none")):
        yield one(f"nifti datatype {label}", nifti(small, patch=datatype(code, bitpix)), ok_or_gate + (413,), "v.nii")
    yield one("nifti float32 NaN", nifti(np.full((16, 16, 3), np.nan, np.float32)), ok_or_gate, "v.nii")
    yield one("nifti float32 inf", nifti(np.full((16, 16, 3), np.inf, np.float32)), ok_or_gate, "v.nii")
    yield one("nifti float64 extremes", nifti(np.tile(np.array([-1e308, 1e308]), (16, 8, 3)).reshape(16, 16, 3)), ok_or_gate, "v.nii")
    yield one("nifti constant", nifti(np.zeros((16, 16, 3), np.int16)), ok_or_gate, "v.nii")
    yield one("nifti scl_slope NaN", nifti(small, patch=field_patch(112, "<f", float("nan"))), ok_or_gate, "v.nii")
    yield one("nifti scl_slope inf", nifti(small, patch=field_patch(112, "<f", float("inf"))), ok_or_gate + (422,), "v.nii")
    yield one("nifti scl_slope 1e38", nifti(small, patch=field_patch(112, "<f", 1e38)), ok_or_gate, "v.nii")
    yield one("nifti scl_inter NaN", nifti(small, patch=lambda h: (field_patch(112, "<f", 2.0)(h), field_patch(116, "<f", float("nan"))(h))), ok_or_gate + (422,), "v.nii")
    yield one("nifti vox_offset huge", nifti(small, patch=field_patch(108, "<f", 1e12)), (413, 422), "v.nii")
    yield one("nifti vox_offset negative", nifti(small, patch=field_patch(108, "<f", -352.0)), (200, 422), "v.nii")
    yield one("nifti vox_offset NaN", nifti(small, patch=field_patch(108, "<f", float("nan"))), (200, 422), "v.nii")
    yield one("nifti truncated data", nifti(small)[:352 + 100], (422,), "v.nii")
    yield one("nifti header only", nifti(small)[:348], (422,), "v.nii")
    yield one("nifti affine NaN", nifti(small, patch=lambda h: (field_patch(252, "<h", 0)(h), field_patch(254, "<h", 1)(h), field_patch(280, "<f", float("nan"))(h))), ok_or_gate, "v.nii")
    yield one("nifti bad magic", nifti(small, patch=lambda h: h.__setitem__(slice(344, 348), b"xxxx")), (415, 422), "v.nii")
    yield one("nifti big-endian", _big_endian_nifti(small), ok_or_gate, "v.nii")
    yield one("nifti 1025 slices", nifti(np.zeros((4, 4, 1025), np.int16)), (413, 422), "v.nii")
    yield one("nifti 1024 tiny slices", nifti(np.zeros((4, 4, 1024), np.int16)), (200, 422), "v.nii")
    slow = ct_volume((64, 64, 512 if full else 128))
    yield one("nifti.gz 64x64 many slices (was quadratic)", nifti(slow, gz=True), ok_or_gate, "v.nii.gz", GZIP)
    side = 128 if full else 64  # ~33 kB of gzip: 1000 slices whose statistics were recomputed over the whole volume per slice
    yield one(f"nifti.gz {side}x{side}x1000 zeros (was quadratic)", nifti(np.zeros((side, side, 1000), np.int16), gz=True), ok_or_gate, "v.nii.gz", GZIP)
    limit_shape = (512, 512, 300) if full else (128, 128, 60)  # the largest volume accepted: 157 MB stored at full scale
    yield one(f"nifti.gz {limit_shape} int16 at the limit", nifti_bomb(limit_shape), ok_or_gate, "v.nii.gz", GZIP)
    limit_side = 4400 if full else 1200  # 19.4 Mpx: just under the 20 Mpx upload limit
    yield one(f"png RGBA {limit_side}x{limit_side} at the limit", png_declaring(limit_side, limit_side, 6), ok_or_gate, "x.png", PNG)
    yield one(f"dicom {limit_side}x{limit_side} at the limit", dicom(np.zeros((limit_side, limit_side), np.int16)), ok_or_gate, "x.dcm", DICOM)
    yield one("nifti2 declares huge", _nifti2_declaring((1 << 40, 1 << 20, 1 << 20)), (413, 415, 422), "v.nii")

    # --- DICOM
    yield one("dicom good", dicom(), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom without preamble", dicom(preamble=False), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom without extension or preamble", dicom(preamble=False), ok_or_gate, "IM000001", OCTET)
    yield one("dicom RLE lossless", dicom(compress_rle=True), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom JPEG lossless garbage", dicom(edit=_jpeg_lossless_garbage), (422,), "x.dcm", DICOM)
    yield one("dicom no pixel data", dicom(edit=_drop_pixels), (422,), "x.dcm", DICOM)
    yield one("dicom truncated pixel data", dicom(edit=_truncate_pixels), (422,), "x.dcm", DICOM)
    yield one("dicom truncated file", dicom()[:400], (422,), "x.dcm", DICOM)
    yield one("dicom declares 20000x20000", dicom(edit=_set(Rows=20000, Columns=20000)), (413, 422), "x.dcm", DICOM)
    yield one("dicom zero rows", dicom(edit=_set(Rows=0)), (422,), "x.dcm", DICOM)
    yield one("dicom frames 100000", dicom(edit=_set(NumberOfFrames=100000)), (413, 422), "x.dcm", DICOM)
    yield one("dicom frames 0", dicom(edit=_set(NumberOfFrames=0)), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom frames not a number", dicom(edit=_set(NumberOfFrames=9876), replace=(b"9876", b"abc ")), (200, 422), "x.dcm", DICOM)
    yield one("dicom bits allocated 64", dicom(edit=_set(BitsAllocated=64, BitsStored=64, HighBit=63)), (422,), "x.dcm", DICOM)
    yield one("dicom bits allocated 1", dicom(edit=_set(BitsAllocated=1, BitsStored=1, HighBit=0)), (200, 422), "x.dcm", DICOM)
    yield one("dicom bits stored 12", dicom(edit=_set(BitsStored=12, HighBit=11)), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom samples per pixel 3", dicom(edit=_set(SamplesPerPixel=3, PhotometricInterpretation="RGB")), (422,), "x.dcm", DICOM)
    yield one("dicom palette colour", dicom(edit=_set(PhotometricInterpretation="PALETTE COLOR")), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom MONOCHROME1 X-ray", dicom(modality="DX", edit=_set(PhotometricInterpretation="MONOCHROME1")), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom rescale slope NaN", dicom(edit=_set(RescaleSlope=7.25), replace=(b"7.25", b"NaN ")), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom rescale slope 1e300", dicom(edit=_set(RescaleSlope="1e300")), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom window centre garbage", dicom(modality="MR", edit=_set(WindowCenter=3.25, WindowWidth=0), replace=(b"3.25", b"abc ")), ok_or_gate + (422,), "x.dcm", DICOM)
    yield one("dicom non-ASCII patient", dicom(edit=_set(PatientName="Müller^Jörg^Ærø")), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom deflated", dicom(syntax="1.2.840.10008.1.2.1.99"), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom deflate bomb", dicom_deflate_bomb(20000 if full else 6000), (413, 422), "x.dcm", DICOM)
    yield one("dicom only preamble", b"\0" * 128 + b"DICM", (422,), "x.dcm", DICOM)
    yield one("dicom implicit VR", dicom(syntax="1.2.840.10008.1.2"), ok_or_gate, "x.dcm", DICOM)
    yield one("dicom big-endian syntax", dicom(syntax="1.2.840.10008.1.2.2"), (200, 422), "x.dcm", DICOM)

    # --- names, fields, query strings, several files
    for name in ("../../etc/passwd", "a" * 5000, "名前.png", "x\x00y.png", "", "con.png", "<script>.png", "%2e%2e%2f.png"):
        yield one(f"filename {name[:12]!r}", good, ok_or_gate + ((400,) if len(name) > 1000 else ()), name, PNG)  # 400: malformed multipart
    yield Case("wrong field name", [("x.png", good, PNG)], (422,), field_name="image")
    yield Case("no files", [], (422,))
    yield Case("heatmap=banana", [("x.png", good, PNG)], (422,), query="heatmap=banana")
    yield Case("study=2", [("x.png", good, PNG)], (422,), query="study=2")
    yield Case("unknown query parameter", [("x.png", good, PNG)], ok_or_gate, query="evil=1")
    yield Case("1001 files", [("x.png", good, PNG)] * 1001, (400, 413))  # more than a request may hold (a zip may)
    yield Case("two good files", [("a.png", good, PNG), ("b.png", good, PNG)], ok_or_gate)
    yield Case("good file and a bad one", [("a.png", good, PNG), ("b.txt", b"not an image", "text/plain")], (200, 422))
    yield Case("bad file and a good one", [("a.txt", b"not an image", "text/plain"), ("b.png", good, PNG)], (200, 422))
    yield Case("three bad files", [("a", b"x", OCTET), ("b", b"", OCTET), ("c", b"\x1f\x8bzz", GZIP)], (415, 422))
    yield Case("study of mixed files", [("a.png", good, PNG), ("v.nii", nifti(small), OCTET), ("bad", b"?", OCTET)], (200, 422), query="study=true")
    yield Case("locked: no key", [("x.png", good, PNG)], (401,), locked=True)
    yield Case("locked: wrong key", [("x.png", good, PNG)], (401,), locked=True, headers={"X-API-Key": "guess"})
    yield Case("locked: non-ASCII key", [("x.png", good, PNG)], (401,), locked=True, headers={"X-API-Key": "clé-ünïcode"})
    yield Case("locked: very long key", [("x.png", good, PNG)], (401,), locked=True, headers={"X-API-Key": "k" * 8000})
    yield Case("locked: right key", [("x.png", good, PNG)], ok_or_gate, locked=True, headers={"X-API-Key": "s3cret"})


def zip_of(members: dict[str, bytes]) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zeros_zip(member_bytes: int, count: int) -> bytes:
    """`count` members of `member_bytes` zeros (about 1000:1)."""
    import zipfile

    buffer, zeros = io.BytesIO(), b"\0" * member_bytes
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for index in range(count):
            archive.writestr(f"zeros-{index:04d}", zeros)
    return buffer.getvalue()


def zip_declaring(size: int) -> bytes:
    """A zip of one 5,000-byte member whose central directory declares `size` bytes (a lie either way)."""
    data = bytearray(zip_of({"IM1": b"\1" * 5000}))
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, size)
    return bytes(data)


def _big_endian_nifti(volume: np.ndarray) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header(endianness=">")
    return nib.Nifti1Image(volume.astype(">i2"), np.eye(4), header).to_bytes()


def _nifti2_declaring(shape: tuple[int, int, int]) -> bytes:
    import nibabel as nib

    data = bytearray(nib.Nifti2Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_bytes())
    struct.pack_into("<8q", data, 16, 3, *shape, 1, 1, 1, 1)
    return bytes(data)


def encoded_request(case: Case) -> tuple[str, dict[str, str], bytes]:
    """(path with query, headers, body) as a raw multipart request, for clients without a files= helper."""
    boundary = "covidscan-hostile-boundary"
    parts = []
    for filename, data, ctype in case.files:
        safe = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{case.field_name}"; filename="{safe}"\r\nContent-Type: {ctype}\r\n\r\n'.encode("utf-8")
            + data + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    if not case.files:
        body = f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", **case.headers}
    return "/api/v1/predict" + (f"?{case.query}" if case.query else ""), headers, body
