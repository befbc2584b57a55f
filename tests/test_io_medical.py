"""DICOM and NIfTI reading: HU, windows, inversion, slices, and no patient data in metadata."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidscan.data import io as cio
from covidscan.errors import ImageReadError
from dicom_helpers import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_dicom


def test_ct_dicom_gets_hounsfield_units_and_the_lung_window(tmp_path: Path) -> None:
    # Stored value + intercept -1024 = HU. Lung window W1500/L-600 spans -1350..150 HU.
    stored = np.array([[0, 424, 1174, 2000]], np.int16)  # HU -1024, -600, 150, 976
    path = write_dicom(tmp_path / "ct.dcm", stored)
    data = cio.read_dicom(path)
    np.testing.assert_allclose(data.pixels[0], [(-1024 + 1350) / 1500, 0.5, 1.0, 1.0], atol=1e-6)
    assert data.meta["modality"] == "CT" and data.meta["format"] == "DICOM"


def test_monochrome1_xray_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 100, 200]], np.int16)
    normal = cio.read_image(write_dicom(tmp_path / "a.dcm", stored, "DX", 0.0, "MONOCHROME2")).pixels
    inverted = cio.read_image(write_dicom(tmp_path / "b.dcm", stored, "DX", 0.0, "MONOCHROME1")).pixels
    np.testing.assert_allclose(normal, [[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(inverted, 1.0 - normal)


def test_no_patient_field_leaks_into_metadata(tmp_path: Path) -> None:
    data = cio.read_image(write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4), np.int16)))
    text = json.dumps(data.meta)
    assert FAKE_PATIENT_ID not in text and "Doe" not in text and "1970" not in text
    assert data.meta["patient_key"] == cio.patient_key(FAKE_PATIENT_ID) != FAKE_PATIENT_ID


def test_not_a_dicom(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\x00" * 300)
    with pytest.raises(ImageReadError, match="x.dcm"):
        cio.read_image(path)


def test_nifti_volume_slices(tmp_path: Path) -> None:
    volume = np.full((6, 5, 4), -1000.0, np.float32)  # air, in HU
    volume[:, :, 2] = 150.0  # one slice at the top of the lung window
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    assert cio.nifti_slice_count(path) == 4
    top = cio.read_image(path, 2)
    assert top.pixels.shape == (5, 6) and np.allclose(top.pixels, 1.0)
    assert np.allclose(cio.read_image(path, 0).pixels, (-1000 + 1350) / 1500)
    with pytest.raises(ImageReadError, match="slice index"):
        cio.read_image(path, 9)
    with pytest.raises(ImageReadError, match="slice index"):
        cio.read_image(path)


def test_folder_of_dicoms_without_patient_folders_uses_the_pseudonymous_key(tmp_path: Path) -> None:
    from covidscan.data.sources import index_folder

    write_dicom(tmp_path / "COVID" / "a.dcm", np.zeros((4, 4), np.int16), patient_id="A")
    write_dicom(tmp_path / "non-COVID" / "b.dcm", np.zeros((4, 4), np.int16), patient_id="B")
    volume = np.zeros((4, 4, 3), np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "COVID" / "vol.nii")
    frame = index_folder(tmp_path)
    assert len(frame) == 2 + 3
    keys = set(frame.loc[frame["path"].str.endswith(".dcm"), "patient_id"])
    assert keys == {cio.patient_key("A"), cio.patient_key("B")}
    assert sorted(frame.loc[frame["path"].str.endswith(".nii"), "slice_index"].tolist()) == [0, 1, 2]
    assert FAKE_PATIENT_NAME not in frame.to_csv()


def test_dicom_acquisition_fields_become_manifest_columns_for_subgroups(tmp_path: Path) -> None:
    """Manufacturer, scanner model, kernel and slice thickness are kept (per-scanner metrics); patient fields are not."""
    import pydicom

    from covidscan.data.manifest import load_manifest, save_manifest
    from covidscan.data.sources import index_folder

    for label, maker, kernel in (("COVID", "Acme", ["B", "45f"]), ("non-COVID", "Other  Corp", "STANDARD")):
        path = write_dicom(tmp_path / label / "x.dcm", np.zeros((4, 4), np.int16), patient_id=label)
        ds = pydicom.dcmread(path)
        ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel, ds.SliceThickness = maker, "Model 1", kernel, "1.25"
        ds.save_as(path)
    frame = load_manifest(save_manifest(index_folder(tmp_path), tmp_path / "m.csv"))
    by_label = frame.set_index("label")
    assert by_label.loc["COVID", "manufacturer"] == "Acme" and by_label.loc["COVID", "kernel"] == "B/45f"
    assert by_label.loc["non-COVID", "manufacturer"] == "Other Corp" and by_label.loc["non-COVID", "slice_thickness"] == "1.25"
    assert by_label.loc["COVID", "scanner"] == "Model 1"
    assert FAKE_PATIENT_NAME not in frame.to_csv() and "19700101" not in frame.to_csv()


def test_extension_less_dicom_from_a_pacs_export_is_found_and_read_by_its_content(tmp_path: Path) -> None:
    """PACS exports name slices IM0001 or by UID, without .dcm: they were skipped ('no images found')."""
    from covidscan.data.sources import index_folder

    stored = np.arange(16, dtype=np.int16).reshape(4, 4) * 50
    write_dicom(tmp_path / "COVID" / "p1" / "IM0001", stored, patient_id="A")
    write_dicom(tmp_path / "COVID" / "p1" / "1.2.840.113619.2.55.3", stored, patient_id="A")
    write_dicom(tmp_path / "non-COVID" / "p2" / "IM0001", stored, patient_id="B")
    (tmp_path / "non-COVID" / "p2" / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))  # an index, not an image
    (tmp_path / "non-COVID" / "p2" / "notes").write_text("not an image")
    frame = index_folder(tmp_path)
    assert sorted(Path(p).name for p in frame["path"]) == ["1.2.840.113619.2.55.3", "IM0001", "IM0001"]
    assert FAKE_PATIENT_NAME not in frame.to_csv()
    image = cio.read_image(tmp_path / "COVID" / "p1" / "IM0001")
    assert image.pixels.shape == (4, 4) and image.meta.get("modality") == "CT"
    with pytest.raises(ImageReadError, match="unsupported file type"):
        cio.read_image(tmp_path / "non-COVID" / "p2" / "notes")
