"""Whole CT studies as a PACS sends them: compressed transfer syntaxes, series choice, slice order, orientation."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidscan.data import io as cio
from covidscan.data.study import ZipStudy, plan_files, plan_study, read_header
from covidscan.errors import ImageReadError
from dicom_helpers import FAKE_PATIENT_ID, LOSSLESS_SYNTAXES, chest_volume, write_ct_series
from hostile_corpus import zip_declaring, zip_of


@pytest.mark.parametrize("syntax", sorted(LOSSLESS_SYNTAXES))
def test_every_lossless_transfer_syntax_a_pacs_sends_decodes_exactly(tmp_path: Path, syntax: str) -> None:
    """JPEG Lossless (Process 14), JPEG-LS, JPEG 2000, RLE, deflated, big endian: the same pixels as uncompressed."""
    volume = chest_volume(48, 2)
    plain = write_ct_series(tmp_path / "plain", volume)
    packed = write_ct_series(tmp_path / syntax, volume, LOSSLESS_SYNTAXES[syntax])
    for reference, compressed in zip(plain, packed):
        assert compressed.suffix == ""  # extension-less, as exported
        expected, got = cio.read_image(reference).pixels, cio.read_image(compressed).pixels
        assert got.shape == (48, 48) and np.array_equal(got, expected)
    hu = volume[0].astype(np.float32) - 1024  # and the pixels are the HU written, in the lung window
    np.testing.assert_allclose(cio.read_image(packed[0]).pixels, np.clip((hu + 1350) / 1500, 0, 1), atol=1e-6)


def test_lossy_jpeg_ls_decodes_within_its_error_bound(tmp_path: Path) -> None:
    from pydicom import dcmread
    from pydicom.uid import JPEGLSNearLossless

    volume = chest_volume(48, 1)
    path = write_ct_series(tmp_path / "plain", volume)[0]
    ds = dcmread(path)
    ds.compress(JPEGLSNearLossless, jls_error=3)
    ds.save_as(tmp_path / "near", enforce_file_format=True)
    got, expected = cio.read_image(tmp_path / "near").pixels, cio.read_image(path).pixels
    assert 0 < np.abs(got - expected).max() <= 3 / 1500 + 1e-6  # at most 3 HU off in a 1500 HU window


def test_series_is_ordered_by_position_not_by_file_name_or_upload_order(tmp_path: Path) -> None:
    volume = chest_volume(32, 7)
    paths = write_ct_series(tmp_path / "s", volume, LOSSLESS_SYNTAXES["jpeg-lossless"], shuffle_seed=3)
    uploaded = sorted(paths, key=lambda p: p.name)  # what a browser sends: name order, not body order
    assert uploaded != paths
    plan = plan_files((p.name, p.read_bytes()) for p in uploaded)
    assert plan.order == "position" and [s.source for s in plan.slices] == [p.name for p in paths]
    # without positions, InstanceNumber orders them
    headers = [read_header(p.read_bytes(), p.name) for p in uploaded]
    no_position = [type(h)(**{**h.__dict__, "position": None}) for h in headers]
    plan = plan_study(no_position)
    assert plan.order == "instance number" and [s.source for s in plan.slices] == [p.name for p in paths]


def test_feet_first_series_still_runs_head_to_feet(tmp_path: Path) -> None:
    volume = chest_volume(32, 4)
    paths = write_ct_series(tmp_path / "s", volume, spacing_mm=-2.5)  # slice k lies k * 2.5 mm higher: reversed body order
    plan = plan_files((p.name, p.read_bytes()) for p in paths)
    assert [s.source for s in plan.slices] == [p.name for p in reversed(paths)]


def test_scouts_other_series_and_stray_files_are_reported_not_fatal(tmp_path: Path) -> None:
    thin = write_ct_series(tmp_path / "export", chest_volume(32, 6), series_number=3, shuffle_seed=None, first_number=1)
    thick = write_ct_series(tmp_path / "export" / "thick", chest_volume(32, 3, seed=1), series_number=2, spacing_mm=5.0)
    scout = write_ct_series(tmp_path / "export" / "scout", chest_volume(32, 1, seed=2), series_number=1,
                            image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    (tmp_path / "export" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "export" / "notes.txt").write_text("export log")
    named = [(str(p.relative_to(tmp_path)), p.read_bytes()) for p in sorted((tmp_path / "export").rglob("*")) if p.is_file()]
    plan = plan_files(named)
    assert [s.source for s in plan.slices] == [str(p.relative_to(tmp_path)) for p in thin]
    reasons = dict(plan.skipped)
    assert reasons[str(scout[0].relative_to(tmp_path))] == "scout / localizer image"
    assert all("another series" in reasons[str(p.relative_to(tmp_path))] for p in thick)
    assert "DICOMDIR" in reasons["export/DICOMDIR"] and reasons["export/notes.txt"] == "not a DICOM file"
    assert "of 2" in plan.series_rule and FAKE_PATIENT_ID not in repr(plan)


def test_a_study_with_no_image_slice_names_what_was_skipped(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no image slices.*notes.txt: not a DICOM file"):
        plan_files([("notes.txt", b"hello")])


def test_zip_of_a_dicom_folder_is_read_and_a_zip_bomb_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "s", chest_volume(32, 3), LOSSLESS_SYNTAXES["rle"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for p in paths:
            archive.write(p, f"EXPORT/SERIES1/{p.name}")
    names = list(ZipStudy(buffer.getvalue(), "study.zip").files())
    assert sorted(names) == sorted(f"EXPORT/SERIES1/{p.name}" for p in paths)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros", b"\0" * 3_000_000)
    with pytest.raises(ImageReadError, match="bomb.zip: zip inflates to 3 MB; the limit is 1 MB"):
        ZipStudy(bomb.getvalue(), "bomb.zip", max_bytes=1_000_000)
    with pytest.raises(ImageReadError, match="x.zip: not a readable zip"):
        ZipStudy(b"PK\x03\x04garbage", "x.zip")


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, 1, 0), (1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0)])
def test_dicom_marker_on_the_patients_right_is_shown_on_image_left(tmp_path: Path, orientation: tuple[int, ...]) -> None:
    """Whatever the stored orientation, the patient's right front ends up top left (radiological display).

    DICOM's patient axes (LPS): x grows toward the patient's left, y toward the back."""
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    stored = np.full((32, 32), 24, np.uint16)  # -1000 HU everywhere
    # the stored pixel (r, c) lies at  r * column + c * row  (mm, spacing 1): put the marker where x < 0 and y < 0
    for r in range(32):
        for c in range(32):
            x, y, _ = (r - 15.5) * column + (c - 15.5) * row
            if x < -8 and -8 < y < 0:  # the patient's right, just in front of the middle: no symmetry hides a flip
                stored[r, c] = 1174  # +150 HU
    path = write_ct_series(tmp_path / "o", stored[None], orientation=tuple(float(v) for v in orientation))[0]
    marker = cio.read_image(path).pixels > 0.5
    expected = np.zeros((32, 32), bool)
    expected[8:16, :8] = True  # rows run front to back, columns from the patient's right to left
    assert np.array_equal(marker, expected)


def test_nifti_marker_on_the_patients_right_is_shown_on_image_left(tmp_path: Path) -> None:
    """NIfTI's axes (RAS+): x grows toward the patient's right, y toward the front. The issue's defect: the marker
    landed on image right (neurological display)."""
    volume = np.full((32, 32, 1), -1000, np.int16)
    volume[24:, 24:, 0] = 150  # identity affine: large x = the patient's right, large y = anterior
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    pixels = cio.read_image(path, 0).pixels
    assert pixels[:8, :8].mean() > 0.99 and pixels[:, 16:].max() < 0.5 and pixels[16:, :].max() < 0.5


def test_a_pacs_export_of_compressed_extension_less_series_indexes_and_audits(tmp_path: Path) -> None:
    """The issue's Siemens series: `data index` succeeded, then `audit` stopped with KeyError 'pixel_sha256'."""
    from covidscan.data.audit import run_audit
    from covidscan.data.sources import index_folder

    for label, seed in (("COVID", 0), ("non-COVID", 1)):
        for patient in ("p1", "p2"):
            write_ct_series(tmp_path / label / f"{label}-{patient}", chest_volume(32, 3, seed), LOSSLESS_SYNTAXES["jpeg-lossless"],
                            patient_id=f"{label}-{patient}", series_number=2)
            write_ct_series(tmp_path / label / f"{label}-{patient}" / "scout", chest_volume(32, 1, 5), patient_id=f"{label}-{patient}",
                            series_number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    frame = index_folder(tmp_path)
    assert len(frame) == 12 and not frame["path"].str.contains("scout").any()  # 4 patients x 3 slices, no scout
    assert (frame["modality"] == "CT").all()  # from the Modality tag: a model trained on it is served as a CT model
    result = run_audit(frame, show=False)
    assert result.properties["readable"].all()


def test_audit_with_no_decodable_image_says_why(tmp_path: Path) -> None:
    from covidscan.data.audit import run_audit
    from covidscan.data.manifest import new_manifest
    from covidscan.errors import DataError

    for name in ("a.dcm", "b.dcm"):
        (tmp_path / name).write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    frame = new_manifest([{"path": str(tmp_path / n), "label": lab, "patient_id": "", "source": "x"}
                          for n, lab in (("a.dcm", "COVID"), ("b.dcm", "non-COVID"))])
    with pytest.raises(DataError, match="none of the 2 images could be read; 2 x DICOM file holds no pixel data"):
        run_audit(frame, show=False)


def test_zip_members_are_inflated_one_at_a_time_when_read_and_checked_while_inflating() -> None:
    """Opening a zip reads its directory only; reading a member's head inflates a few bytes; a member that inflates
    past its declared size is refused while inflating; one over the per-file limit is refused before inflating."""
    import tracemalloc

    data = zip_of({f"zeros-{i}": b"\0" * 20_000_000 for i in range(3)})  # 60 MB inflated, 60 kB sent
    tracemalloc.start()
    files = ZipStudy(data, "big.zip").files("big.zip:")
    heads = [files.head(name) for name in files]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [len(h) for h in heads] == [1024] * 3 and peak < 5_000_000  # before: every member materialised (60 MB)
    with pytest.raises(ImageReadError, match="the limit for one file of a zip is 10 MB"):
        ZipStudy(data, "big.zip", max_member_bytes=10_000_000)
    study = ZipStudy(zip_declaring(50), "liar.zip")  # 5,000 bytes inflate from a member that declares 50
    with pytest.raises(ImageReadError, match="liar.zip:IM1: (cannot extract from the zip|zip member is larger than)"):
        study.files()["IM1"]  # zipfile stops at the declared size and the CRC then fails: never more is inflated


def test_a_multi_frame_study_is_converted_one_frame_at_a_time(tmp_path: Path) -> None:
    """The frames of a multi-frame CT are decoded one at a time from the file's bytes and converted to the model's gray
    (and HU) as they are asked for (before: every frame decoded, then converted twice in float32, before the first
    was analysed)."""
    import tracemalloc

    from pydicom import dcmread

    from covidscan.data.study import StudyFiles, iter_study_images

    volume = chest_volume(256, 40)
    single = write_ct_series(tmp_path / "s", volume[:1], LOSSLESS_SYNTAXES["explicit"])[0]
    ds = dcmread(single)
    ds.NumberOfFrames, ds.PixelData = len(volume), np.ascontiguousarray(volume).astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "multi.dcm")
    files = StudyFiles.in_memory([("multi.dcm", (tmp_path / "multi.dcm").read_bytes())])
    plan = plan_files(files.items())
    skipped: list[tuple[str, str]] = []
    tracemalloc.start()
    names = []
    for name, image in iter_study_images(plan, files, skipped, keep_hu=True):
        names.append(name)
        del image
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert names == [f"multi.dcm frame {k}" for k in range(1, 41)] and not skipped
    stored = volume.size * 2  # the stored values of all frames: 5.2 MB (gray + HU of all frames in float32: 21 MB)
    assert peak < stored / 2, peak  # frame by frame: 1.6 MB; decoding the file whole held 10.5 MB (stored values twice)


def test_a_deflate_bomb_is_refused_before_it_inflates_when_read_or_planned() -> None:
    """A deflated DICOM whose body inflates to gigabytes: the upload path (which first looks for several frames) and
    study planning (headers only) both read it within the limits its header allows (before: dcmread inflated it all,
    +1.5 GB in the full-scale hostile benchmark)."""
    import tracemalloc

    from covidscan.data.io import iter_image_bytes
    from hostile_corpus import dicom_deflate_bomb

    data = dicom_deflate_bomb(8000)  # 64 Mpx: over the 60 Mpx limit of any DICOM frame
    for read in (lambda: list(iter_image_bytes(data, "x.dcm")), lambda: read_header(data, "x.dcm")):
        tracemalloc.start()
        with pytest.raises(ImageReadError, match="x.dcm: DICOM image of 8000x8000 px exceeds the limit"):
            read()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 20_000_000, peak
