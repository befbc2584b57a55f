"""Make small DICOM files in tests (pydicom), with fake patient fields to prove they never leak."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

FAKE_PATIENT_NAME = "Doe^Jane"
FAKE_PATIENT_ID = "PID-0042"


def write_dicom(path: Path, stored: np.ndarray, modality: str = "CT", intercept: float = -1024.0,
                photometric: str = "MONOCHROME2", patient_id: str = FAKE_PATIENT_ID) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = FAKE_PATIENT_NAME, patient_id, "19700101"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = stored.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------- CT series as a PACS exports them
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"  # Process 14, Selection Value 1: the most common syntax in PACS archives
LOSSLESS_SYNTAXES = {
    "jpeg-lossless": JPEG_LOSSLESS,
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "jpeg-2000": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
    "deflated": "1.2.840.10008.1.2.1.99",
    "big-endian": "1.2.840.10008.1.2.2",
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
}


def chest_volume(size: int, slices: int, seed: int = 0) -> np.ndarray:
    """Stored CT values (unsigned 12-bit, HU = value - 1024), (slices, rows, columns): body, two lungs, a marker.

    The lungs change size along the volume so that every slice differs (the order can be checked)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    volume = np.empty((slices, size, size), np.uint16)
    for k in range(slices):
        hu = np.full((size, size), -1000.0)
        hu[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1] = 40.0
        radius = 0.10 + 0.08 * k / max(slices - 1, 1)
        for centre in (0.3, 0.7):
            hu[((xx - centre) / radius) ** 2 + ((yy - 0.5) / (1.6 * radius)) ** 2 < 1] = -850.0
        hu += rng.normal(0, 20, hu.shape)
        volume[k] = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    return volume


def _encode(ds: Dataset, frame: np.ndarray, syntax: str) -> None:
    """Compress with pydicom's own encoders; JPEG Lossless (no pydicom encoder) with libjpeg-turbo via imagecodecs."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    if syntax == JPEG_LOSSLESS:
        import imagecodecs

        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    elif syntax in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"):
        ds.compress(UID(syntax))
    elif syntax == "1.2.840.10008.1.2.2":  # big endian: the pixel bytes swapped, the writer swaps the header
        ds.PixelData = frame.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = UID(syntax)


def write_ct_series(
    folder: Path, volume: np.ndarray, syntax: str = "1.2.840.10008.1.2.1", extension: str = "", patient_id: str = FAKE_PATIENT_ID,
    series_uid: str | None = None, spacing_mm: float = 2.5, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    shuffle_seed: int | None = 0, series_number: int = 2, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL", first_number: int = 1,
) -> list[Path]:
    """One file per slice, named as a PACS export does (IM000123, no extension), in shuffled order of names.

    Slice k lies at z = -k * spacing (feet first: the last slice is the lowest); InstanceNumber counts from
    `first_number`. Returns the paths in anatomical order (slice 0 first)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid(entropy_srcs=[str(folder), str(series_number)])
    study_uid = generate_uid(entropy_srcs=[patient_id, "study"])
    order = list(range(len(volume)))
    names = list(range(len(volume)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(names)
    paths = []
    row, column = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, column)
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, series_number
        ds.Modality, ds.ImageType = "CT", image_type
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = FAKE_PATIENT_NAME, patient_id, "19700101"
        ds.InstanceNumber = first_number + k
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in -k * spacing_mm * normal]
        ds.SliceThickness, ds.PixelSpacing = spacing_mm, [0.7, 0.7]
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        frame = np.ascontiguousarray(volume[k]).astype(np.uint16)
        ds.PixelData = frame.tobytes()
        _encode(ds, frame, syntax)
        path = folder / f"IM{names[k] + 1:06d}{extension}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_series(tiny_run: Path, folder: Path, count: int, syntax: str = LOSSLESS_SYNTAXES["jpeg-lossless"]) -> list[Path]:
    """The tiny run's test slices as a CT series (HU that the lung window maps back to the same gray), shuffled names."""
    import pandas as pd
    from PIL import Image

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    grays = [np.asarray(Image.open(p).convert("L"), np.float32) for p in paths]
    stored = np.stack([np.round(-1350.0 + grays[i % len(grays)] / 255.0 * 1500.0 + 1024).clip(0, 4095) for i in range(count)])
    return write_ct_series(folder, stored.astype(np.uint16), syntax, shuffle_seed=1)


def mostly_refused_series(tiny_run: Path, folder: Path, clean: int = 4, noisy: int = 8) -> list[Path]:
    """A CT series of the tiny run's test slices in which most slices carry strong noise: they still show lung, but the
    input gate refuses them (another scanner's images, as far as the model can tell)."""
    import pandas as pd
    from PIL import Image

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    rng = np.random.default_rng(0)
    grays = [np.asarray(Image.open(paths[i % len(paths)]).convert("L"), np.float32) / 255.0 for i in range(clean + noisy)]
    grays = [g if i < clean else np.clip(g + rng.normal(0, 0.25, g.shape), 0, 1) for i, g in enumerate(grays)]
    stored = np.stack([np.round(-1350.0 + g * 1500.0 + 1024).clip(0, 4095) for g in grays])
    return write_ct_series(folder, stored.astype(np.uint16), LOSSLESS_SYNTAXES["explicit"], shuffle_seed=1)
