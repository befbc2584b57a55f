"""A CT study as a PACS sends it: hundreds of DICOM files (a folder, a zip, or many uploads), one series, body order.

Only headers are read to plan the study (pixel data is skipped), so the plan
costs little even for 600 slices; the slices are decoded afterwards, one at a
time, in the planned order. The rules (README, "From a PACS export"):

- **what is a slice**: every file whose content is DICOM, whatever its name
  (PACS exports often have no extension); a DICOMDIR index, hidden files and
  files that are not DICOM are reported as skipped, never fatal;
- **scouts are skipped**: images whose ImageType says LOCALIZER (or SCOUT);
- **series choice**: the series with the most slices; ties go to the thinner
  slices, then the lower SeriesNumber. The other series are reported;
- **order**: by position along the slice normal (ImagePositionPatient and
  ImageOrientationPatient), the most superior (head) slice first; without
  positions by InstanceNumber; without either in the order the files came.

No patient field is read into the plan: series are told apart by a hash of
their UID and by SeriesNumber.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidscan.data.io import modality_family
from covidscan.errors import ImageReadError

if TYPE_CHECKING:
    from covidscan.data.io import ImageData

MAX_STUDY_FILES = 2048  # files in one study (a 1 mm chest CT has 300-400; a multi-series export more)
MAX_ZIP_BYTES = 2_000_000_000  # inflated bytes of one zip upload or file (a zip bomb stops here)
_SCOUT_TYPES = ("LOCALIZER", "SCOUT")


@dataclass(frozen=True)
class SliceHeader:
    """What planning needs of one DICOM file: geometry and series, no pixels, no patient field."""

    source: str  # the file's name for messages (relative path or upload position + name)
    series: str  # a short hash of SeriesInstanceUID (or of the geometry when there is none)
    series_number: int | None
    instance: int | None
    position: float | None  # mm along the slice normal, larger = more superior for axial slices
    thickness: float | None
    scout: bool
    frames: int = 1
    modality: str = ""  # 'CT', 'CXR' or '' (data.io.modality_family): which served model answers


@dataclass
class StudyPlan:
    """The chosen series' files in body order, and everything that was left out, with the reason."""

    slices: list[SliceHeader]
    order: str  # "position" | "instance number" | "as received"
    series_rule: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    def describe(self) -> str:
        return (f"{len(self.slices)} slices, ordered by {self.order}; {self.series_rule}"
                + (f"; {len(self.skipped)} file(s) skipped" if self.skipped else ""))


def is_scout(ds: object) -> bool:
    """A scout / localizer image (ImageType LOCALIZER or SCOUT): a planning view, not a slice to classify."""
    value = getattr(ds, "ImageType", None) or []
    image_type = "\\".join(str(v).upper() for v in ([value] if isinstance(value, str) else value))
    return any(kind in image_type for kind in _SCOUT_TYPES)


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _position(ds: object) -> float | None:
    """Signed distance of the slice along its normal (mm); for axial slices the LPS z (head = larger)."""
    try:
        origin = np.array([float(v) for v in ds.ImagePositionPatient], float)  # type: ignore[attr-defined]
        cosines = np.array([float(v) for v in ds.ImageOrientationPatient], float)  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return None
    if origin.shape != (3,) or cosines.shape != (6,) or not (np.isfinite(origin).all() and np.isfinite(cosines).all()):
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    if np.linalg.norm(normal) < 0.5:
        return None
    if abs(normal[2]) >= max(abs(normal[0]), abs(normal[1])) and normal[2] < 0:
        normal = -normal  # axial: measure toward the head whichever way the rows and columns run
    return float(origin @ normal)


def read_header(data: bytes, source: str) -> SliceHeader:
    """The planning fields of one DICOM file (pixel data is not read). Raises ImageReadError naming `source`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        if "SOPClassUID" not in ds and "Rows" not in ds:
            raise ImageReadError(source, "not a DICOM image (no SOP class, no image size)")
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        key = uid or f"{ds.get('Rows')}x{ds.get('Columns')}:{ds.get('ImageOrientationPatient')}"
        instance, number = _number(ds.get("InstanceNumber")), _number(ds.get("SeriesNumber"))
        return SliceHeader(
            source=source, series=hashlib.sha256(key.encode()).hexdigest()[:10],
            series_number=int(number) if number is not None else None, instance=int(instance) if instance is not None else None,
            position=_position(ds), thickness=_number(ds.get("SliceThickness")),
            scout=is_scout(ds), frames=max(int(_number(ds.get("NumberOfFrames")) or 1), 1),
            modality=modality_family(ds.get("Modality", "")),
        )
    except ImageReadError:
        raise
    except (InvalidDicomError, EOFError):
        raise ImageReadError(source, "not a valid DICOM file") from None
    except Exception as exc:
        raise ImageReadError(source, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None


def plan_study(headers: Iterable[SliceHeader], skipped: Iterable[tuple[str, str]] = ()) -> StudyPlan:
    """Choose one series and order its slices (the rules in the module docstring)."""
    headers, skipped = list(headers), list(skipped)
    slices = []
    for header in headers:
        if header.scout:
            skipped.append((header.source, "scout / localizer image"))
        else:
            slices.append(header)
    if not slices:
        raise ImageReadError("study", "no image slices: " + (f"{len(skipped)} file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"
                                                            if skipped else "no files"))
    series: dict[str, list[SliceHeader]] = {}
    for header in slices:
        series.setdefault(header.series, []).append(header)

    def preference(key: str) -> tuple[int, float, int]:
        members = series[key]
        thickness = min((h.thickness for h in members if h.thickness), default=np.inf)
        number = min((h.series_number for h in members if h.series_number is not None), default=1 << 30)
        return (-sum(h.frames for h in members), thickness, number)

    chosen = min(series, key=preference)
    for key, members in series.items():
        if key != chosen:
            skipped += [(h.source, f"another series (SeriesNumber {h.series_number}, {len(members)} slices)") for h in members]
    rule = "the series with the most slices" if len(series) > 1 else "one series"
    picked = series[chosen]
    if all(h.position is not None for h in picked):
        ordered, order = sorted(picked, key=lambda h: (-h.position, h.instance or 0)), "position"  # type: ignore[operator]
    elif all(h.instance is not None for h in picked):
        ordered, order = sorted(picked, key=lambda h: h.instance), "instance number"  # type: ignore[arg-type,return-value]
    else:
        ordered, order = picked, "as received"
    return StudyPlan(ordered, order, rule + (f" (of {len(series)})" if len(series) > 1 else ""), skipped)


def _skip_name(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    if not base or base.startswith(".") or "__MACOSX" in name:
        return "hidden or system file"
    if base.upper() == "DICOMDIR":
        return "DICOMDIR index (the images are read directly)"
    return None


def zip_members(data: bytes, where: str, max_files: int = MAX_STUDY_FILES, max_bytes: int = MAX_ZIP_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in a zip of a DICOM folder; the declared and the real sizes are both bounded."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ImageReadError(where, f"not a readable zip file ({exc})") from None
    if len(infos) > max_files:
        raise ImageReadError(where, f"zip holds {len(infos)} files; at most {max_files} per study")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise ImageReadError(where, f"zip inflates to {declared / 1e6:,.0f} MB; the limit is {max_bytes / 1e6:,.0f} MB")
    total = 0
    for info in infos:
        try:
            with archive.open(info) as member:
                content = member.read(info.file_size + 1)  # never more than declared (+1 to see a lie)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise ImageReadError(f"{where}:{info.filename}", f"cannot extract from the zip ({exc})") from None
        if len(content) > info.file_size:
            raise ImageReadError(f"{where}:{info.filename}", "zip member is larger than its header declares (zip bomb?)")
        total += len(content)
        yield info.filename, content


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def folder_files(folder: Path, max_files: int = MAX_STUDY_FILES) -> list[Path]:
    """Every regular file under `folder`, sorted by relative path (the fallback order)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) > max_files:
        raise ImageReadError(folder, f"{len(files)} files; at most {max_files} per study")
    return files


def plan_files(named: Iterable[tuple[str, bytes]]) -> StudyPlan:
    """Plan a study from (name, bytes) pairs: DICOM by content, everything else reported as skipped."""
    from covidscan.data.io import sniff_kind

    headers, skipped = [], []
    for name, data in named:
        reason = _skip_name(name)
        if reason is None and sniff_kind(data) != "dicom":
            reason = "not a DICOM file"
        if reason:
            skipped.append((name, reason))
            continue
        try:
            headers.append(read_header(data, name))
        except ImageReadError as exc:
            skipped.append((name, exc.problem))
    return plan_study(headers, skipped)


def iter_study_images(plan: StudyPlan, data: dict[str, bytes], skipped: list[tuple[str, str]], keep_hu: bool = False
                      ) -> Iterator[tuple[str, ImageData]]:
    """(slice name, image) for every frame of the planned files, in body order, one file decoded at a time;
    a file that fails to decode is added to `skipped` with its reason, never fatal."""
    from covidscan.data.io import iter_image_bytes

    for header in plan.slices:
        try:
            frames = list(iter_image_bytes(data[header.source], header.source, keep_hu=keep_hu))
        except ImageReadError as exc:
            skipped.append((header.source, exc.problem))
            continue
        for number, image in enumerate(frames):
            yield header.source + (f" frame {number + 1}" if len(frames) > 1 else ""), image


def read_study_input(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file of a study given as a folder (any depth) or a zip; names relative to it."""
    path = Path(path)
    if path.is_dir():
        return [(str(p.relative_to(path)), p.read_bytes()) for p in folder_files(path)]
    data = path.read_bytes()
    if not is_zip(data):
        raise ImageReadError(path, "a study is a folder of DICOM files or a zip of one")
    return list(zip_members(data, str(path)))

