"""A CT study as a PACS sends it: hundreds of DICOM files (a folder, a zip, or many uploads), one series, body order.

Only headers are read to plan the study (pixel data is skipped), so the plan
costs little even for 600 slices; the slices are decoded afterwards, one at a
time, in the planned order. The rules (README, "From a PACS export"):

- **what is a slice**: every file whose content is DICOM, whatever its name
  (PACS exports often have no extension); a DICOMDIR index, hidden files and
  files that are not DICOM are reported as skipped, never fatal;
- **scouts are skipped**: images whose ImageType says LOCALIZER (or SCOUT);
- **series choice**: of the series a served model can analyse (its Modality), the one
  with the most slices; ties go to the thinner slices, then the lower SeriesNumber.
  The other series are reported, each with why it was skipped;
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidscan.data.io import routing_modality
from covidscan.errors import ImageReadError, exception_summary

if TYPE_CHECKING:
    from covidscan.data.io import ImageData

MAX_STUDY_FILES = 2048  # files in one study (a 1 mm chest CT has 300-400; a multi-series export more)
MAX_ZIP_BYTES = 2_000_000_000  # inflated bytes of one zip upload or file (a zip bomb stops here)
MAX_MEMBER_BYTES = 256_000_000  # one file of a zip, inflated (a 300-frame 512x512 CT is 157 MB); one is in memory at a time
SNIFF_BYTES = 1024  # enough of a file to recognise its kind
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
    modality: str = ""  # 'CT', 'CXR', another DICOM Modality ('MR') or '' (data.io.routing_modality): which served model answers


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
    from pydicom.errors import InvalidDicomError

    from covidscan.data.io import read_dicom_header

    try:
        ds = read_dicom_header(data, source)
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
            modality=routing_modality(ds.get("Modality", "")),
        )
    except ImageReadError:
        raise
    except (InvalidDicomError, EOFError):
        raise ImageReadError(source, "not a valid DICOM file") from None
    except Exception as exc:
        raise ImageReadError(source, f"not a readable DICOM file ({exception_summary(exc)})") from None


def plan_study(headers: Iterable[SliceHeader], skipped: Iterable[tuple[str, str]] = (),
               servable: Callable[[str], bool] | None = None) -> StudyPlan:
    """Choose one series and order its slices (the rules in the module docstring); `servable(modality)` says which
    series a served model can analyse (serve/router.Router.can_serve; None: all)."""
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

    def can_serve(key: str) -> bool:
        return servable is None or servable(series[key][0].modality)

    def preference(key: str) -> tuple[bool, int, float, int]:
        members = series[key]
        thickness = min((h.thickness for h in members if h.thickness), default=np.inf)
        number = min((h.series_number for h in members if h.series_number is not None), default=1 << 30)
        return (not can_serve(key), -sum(h.frames for h in members), thickness, number)

    chosen = min(series, key=preference)
    for key, members in series.items():
        if key != chosen:
            why = "" if can_serve(key) or not can_serve(chosen) else f"; modality {members[0].modality or 'unknown'}: no model served for it"
            skipped += [(h.source, f"another series (SeriesNumber {h.series_number}, {len(members)} slices{why})") for h in members]
    rule = ("the series with the most slices" + (" that a served model can analyse" if servable is not None else "")
            if len(series) > 1 else "one series")
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


class StudyFiles(Mapping[str, bytes]):
    """A study's files by name, each read only when asked (a zip member inflated, a spooled file read from disk), so
    a study of 2,000 files never holds more than one of them in memory; `head` reads just enough to recognise it."""

    def __init__(self, readers: dict[str, Callable[[], bytes]], heads: dict[str, Callable[[], bytes]] | None = None) -> None:
        self._readers, self._heads = readers, heads or {}

    @classmethod
    def in_memory(cls, named: Iterable[tuple[str, bytes]]) -> StudyFiles:
        return cls({name: (lambda data=data: data) for name, data in named})

    def __getitem__(self, name: str) -> bytes:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def head(self, name: str, size: int = SNIFF_BYTES) -> bytes:
        """The file's first bytes (enough for `data.io.sniff_kind`)."""
        reader = self._heads.get(name)
        return reader()[:size] if reader else self[name][:size]

    @classmethod
    def combined(cls, parts: Iterable[StudyFiles]) -> StudyFiles:
        readers: dict[str, Callable[[], bytes]] = {}
        heads: dict[str, Callable[[], bytes]] = {}
        for part in parts:
            readers.update(part._readers)
            heads.update(part._heads)
        return cls(readers, heads)


class ZipStudy:
    """A zip of a DICOM folder, checked from its directory (file count, declared sizes) before anything is inflated;
    each member is inflated when asked, in chunks, and refused as soon as it inflates past what it declared."""

    def __init__(self, data: bytes, where: str, max_files: int = MAX_STUDY_FILES, max_bytes: int = MAX_ZIP_BYTES,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> None:
        self.where = where
        try:
            self.archive = zipfile.ZipFile(io.BytesIO(data))
            infos = [info for info in self.archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ImageReadError(where, f"not a readable zip file ({exception_summary(exc)})") from None
        if len(infos) > max_files:
            raise ImageReadError(where, f"zip holds {len(infos)} files; at most {max_files} per study")
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise ImageReadError(where, f"zip inflates to {declared / 1e6:,.0f} MB; the limit is {max_bytes / 1e6:,.0f} MB")
        largest = max(infos, key=lambda info: info.file_size, default=None)
        if largest is not None and largest.file_size > max_member_bytes:
            raise ImageReadError(f"{where}:{largest.filename}", f"inflates to {largest.file_size / 1e6:,.0f} MB; the limit for "
                                                                f"one file of a zip is {max_member_bytes / 1e6:,.0f} MB")
        self.infos = infos

    def read(self, info: zipfile.ZipInfo, limit: int | None = None) -> bytes:
        """One member inflated (at most `limit` bytes of it), never past its declared size (+1 byte to see a lie)."""
        wanted = info.file_size + 1 if limit is None else min(limit, info.file_size + 1)
        out, total = io.BytesIO(), 0  # grows in place: the member is held once (joining chunks held it twice)
        try:
            with self.archive.open(info) as member:
                while total < wanted:
                    chunk = member.read(min(1 << 20, wanted - total))
                    if not chunk:
                        break
                    out.write(chunk)
                    total += len(chunk)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError, EOFError) as exc:
            raise ImageReadError(f"{self.where}:{info.filename}", f"cannot extract from the zip ({exception_summary(exc)})") from None
        if total > info.file_size:
            raise ImageReadError(f"{self.where}:{info.filename}", "zip member is larger than its header declares (zip bomb?)")
        return out.getvalue()

    def files(self, prefix: str = "") -> StudyFiles:
        """The members as StudyFiles named `prefix` + member name (a repeated name gets ' (2)', ' (3)', ...)."""
        readers: dict[str, Callable[[], bytes]] = {}
        heads: dict[str, Callable[[], bytes]] = {}
        for info in self.infos:
            name, n = prefix + info.filename, 2
            while name in readers:
                name, n = f"{prefix}{info.filename} ({n})", n + 1
            readers[name] = lambda info=info: self.read(info)
            heads[name] = lambda info=info: self.read(info, SNIFF_BYTES)
        return StudyFiles(readers, heads)


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def folder_files(folder: Path, max_files: int = MAX_STUDY_FILES) -> list[Path]:
    """Every regular file under `folder`, sorted by relative path (the fallback order)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) > max_files:
        raise ImageReadError(folder, f"{len(files)} files; at most {max_files} per study")
    return files


def plan_files(named: Iterable[tuple[str, bytes]], servable: Callable[[str], bool] | None = None) -> StudyPlan:
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
    return plan_study(headers, skipped, servable)


def iter_study_images(plan: StudyPlan, data: Mapping[str, bytes], skipped: list[tuple[str, str]], keep_hu: bool = False
                      ) -> Iterator[tuple[str, ImageData]]:
    """(slice name, image) for every frame of the planned files, in body order, one file read and one frame converted
    at a time (a multi-frame file is decoded once, its frames converted as the caller asks); a file that fails to
    decode is added to `skipped` with its reason (from the failing frame on), never fatal."""
    from covidscan.data.io import iter_image_bytes

    for header in plan.slices:
        produced = 0
        try:
            for image in iter_image_bytes(data[header.source], header.source, keep_hu=keep_hu):
                produced += 1
                yield header.source + (f" frame {produced}" if header.frames > 1 else ""), image
        except ImageReadError as exc:
            skipped.append((header.source + (f" from frame {produced + 1}" if produced else ""), exc.problem))


def read_study_input(path: Path) -> StudyFiles:
    """Every file of a study given as a folder (any depth) or a zip, named relative to it, each read when asked."""
    path = Path(path)
    if path.is_dir():
        return folder_study(path)
    data = path.read_bytes()
    if not is_zip(data):
        raise ImageReadError(path, "a study is a folder of DICOM files or a zip of one")
    return ZipStudy(data, str(path)).files()


def folder_study(folder: Path, max_files: int = MAX_STUDY_FILES) -> StudyFiles:
    """The files under `folder` as StudyFiles (read from disk when asked), named by their relative path."""
    return StudyFiles({str(p.relative_to(folder)): p.read_bytes for p in folder_files(folder, max_files)})

