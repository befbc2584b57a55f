"""Turn image folders and CSV lists into a Manifest.

Layouts: `ROOT/<class>/<image>` and `ROOT/<class>/<patient>/<image>` (any
depth below the patient folder), or a CSV with `path,label[,patient_id]`.
Class names map onto a label set case-insensitively, ignoring punctuation
("CT_COVID", "covid-19" -> COVID). NIfTI volumes and multi-frame DICOM
files become one row per slice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidscan.data.io import is_dicom_file, is_image_file, is_volume_file, modality_family, nifti_slice_count, patient_key
from covidscan.data.manifest import new_manifest, read_csv_table
from covidscan.errors import DataError, ImageReadError, exception_summary

_BINARY_ALIASES: dict[str, tuple[str, ...]] = {
    "COVID": ("covid", "covid19", "ctcovid", "covidpositive", "positive", "sarscov2", "covid19pneumonia"),
    "non-COVID": (
        "noncovid", "ctnoncovid", "noncovid19", "normal", "negative", "healthy",
        "nofinding", "covidnegative", "other", "pneumonia", "nonpneumonia",
    ),
}


def normalise_name(name: str) -> str:
    """Lower-case and drop everything but letters and digits: 'CT_NonCOVID' -> 'ctnoncovid'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class LabelSet:
    """The classes a data set is mapped onto, with the folder names each accepts."""

    classes: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]]

    @classmethod
    def binary(cls) -> LabelSet:
        return cls(classes=("non-COVID", "COVID"), aliases=dict(_BINARY_ALIASES))

    @classmethod
    def parse(cls, spec: str | None) -> LabelSet | None:
        """Parse 'binary', 'auto' (None: use folder names) or 'A,B,C' / 'A=x,y;B=z'."""
        if spec is None or spec.strip().lower() == "binary":
            return cls.binary()
        if spec.strip().lower() == "auto":
            return None
        aliases: dict[str, tuple[str, ...]] = {}
        if "=" in spec:
            for part in spec.split(";"):
                name, _, names = part.partition("=")
                aliases[name.strip()] = tuple(normalise_name(n) for n in names.split(",") if n.strip())
        else:
            for name in spec.split(","):
                aliases[name.strip()] = ()
        if len(aliases) < 2 or any(not name for name in aliases):
            raise DataError("--labels", f"a label set needs at least two named classes, got {spec!r}")
        return cls(classes=tuple(aliases), aliases=aliases)

    def lookup(self, folder_name: str) -> str | None:
        """The class a folder name belongs to, or None."""
        key = normalise_name(folder_name)
        for name in self.classes:
            if key == normalise_name(name) or key in self.aliases.get(name, ()):
                return name
        return None


ACQUISITION_FIELDS = {  # manifest column -> DICOM keyword: how the image was made, never who it shows
    "manufacturer": "Manufacturer",
    "scanner": "ManufacturerModelName",
    "kernel": "ConvolutionKernel",
    "slice_thickness": "SliceThickness",
    "view": "ViewPosition",  # X-ray projection: PA, AP, LL, ...
}
_LATERAL_VIEWS = {"L", "LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}


def is_lateral(view: object) -> bool:
    """A lateral chest X-ray (ViewPosition LL/RL, 'L' in ieee8023's table): left out by default, as in the seeds."""
    return str(view or "").strip().upper() in _LATERAL_VIEWS


def _dicom_text(value: object) -> str:
    """A header value as short plain text (multi-valued kernels joined with '/')."""
    if value is None:
        return ""
    items = list(value) if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") else [value]
    return "/".join(" ".join(str(v).split()) for v in items)[:64]


def _dicom_header(path: Path) -> tuple[int, str, dict[str, str]]:
    """(frames, pseudonymous patient key, acquisition fields) from a DICOM header, without pixel data; 0 frames for
    a scout / localizer image (a planning view that is not a slice to classify).

    The acquisition fields (manufacturer, scanner model, reconstruction kernel,
    slice thickness) become manifest columns, so results can be reported per scanner.
    """
    import pydicom

    from covidscan.data.study import is_scout

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise ImageReadError(path, f"not a valid DICOM file ({exception_summary(exc)})") from None
    if is_scout(ds):
        return 0, "", {}
    pid = str(getattr(ds, "PatientID", "") or "")
    acquisition = {column: _dicom_text(getattr(ds, keyword, None)) for column, keyword in ACQUISITION_FIELDS.items()}
    acquisition["modality"] = modality_family(getattr(ds, "Modality", ""))
    return int(getattr(ds, "NumberOfFrames", 1) or 1), patient_key(pid) if pid else "", acquisition


def image_rows(path: Path, label: str, patient_id: str, source: str) -> list[dict[str, object]]:
    """Manifest rows for one file: one per slice for volumes, else one."""
    base: dict[str, object] = {"path": str(path), "label": label, "patient_id": patient_id, "source": source}
    slices = 1
    if is_volume_file(path):
        slices = nifti_slice_count(path)
        base["modality"] = "CT"  # a NIfTI volume is a CT series (covidscan reads no other)
    elif is_dicom_file(path):
        slices, key, acquisition = _dicom_header(path)
        if slices == 0 or is_lateral(acquisition.get("view")):
            return []  # a scout, or a lateral X-ray
        base.update(acquisition)
        if not patient_id and key:
            base["patient_id"] = key
    if slices == 1 and not is_volume_file(path):
        return [base]
    return [{**base, "slice_index": i} for i in range(slices)]


def require_two_classes(frame: pd.DataFrame, where: str | Path) -> pd.DataFrame:
    found = sorted(frame["label"].unique())
    if len(found) < 2:
        raise DataError(where, f"only one class ({found[0]}) found; a classifier needs at least two classes")
    return frame


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_folder(
    root: str | Path, labels: LabelSet | str | None = "binary", source: str | None = None, single_class_ok: bool = False
) -> pd.DataFrame:
    """Index `root/<class>/[<patient>/]<image>` into a manifest.

    `labels` is a LabelSet or its spec ('binary', 'auto' = folder names,
    'A,B,C'). Raises DataError naming the folder when it is missing, empty,
    unmapped or holds a single class.
    """
    if isinstance(labels, str):
        labels = LabelSet.parse(labels)
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(root, "data folder does not exist")
    if not root.is_dir():
        raise DataError(root, "is a file, not a data folder")
    rows: list[dict[str, object]] = []
    unmapped: list[str] = []
    for folder in _class_folders(root):
        label = folder.name if labels is None else labels.lookup(folder.name)
        images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        if label is None:
            if images:
                unmapped.append(folder.name)
            continue
        for image in images:
            parts = image.relative_to(folder).parts
            rows.extend(image_rows(image, label, parts[0] if len(parts) > 1 else "", source or root.name))
    if unmapped and labels is not None:
        raise DataError(
            root,
            f"class folder(s) {unmapped} match no class of the label set {list(labels.classes)}; "
            "declare them with --labels (e.g. --labels 'COVID=covid;non-COVID=normal,pneumonia') or use --labels auto",
        )
    if not rows:
        raise DataError(root, "no images found; expected ROOT/<class>/<image> or ROOT/<class>/<patient>/<image> (PNG/JPEG/DICOM/NIfTI)")
    frame = new_manifest(rows)
    return frame if single_class_ok else require_two_classes(frame, root)


def map_labels(values: pd.Series, labels: LabelSet | None, where: str | Path) -> pd.Series:
    """Map raw class names onto the label set; unmapped names are an error listing them."""
    if labels is None:
        return values.astype(str)
    mapped = values.astype(str).map(labels.lookup)
    unmapped = sorted(values[mapped.isna()].astype(str).unique())
    if unmapped:
        raise DataError(where, f"label(s) {unmapped[:10]} match no class of {list(labels.classes)}; declare them with --labels")
    return mapped


def index_csv(path: str | Path, labels: LabelSet | str | None = "binary", source: str | None = None) -> pd.DataFrame:
    """Index a CSV with columns path,label[,patient_id]; relative paths are relative to the CSV."""
    if isinstance(labels, str):
        labels = LabelSet.parse(labels)
    path = Path(path).expanduser().resolve()
    table = read_csv_table(path)
    table.columns = [c.strip().lower() for c in table.columns]
    if not {"path", "label"} <= set(table.columns):
        raise DataError(path, f"CSV needs columns path,label[,patient_id]; it has {list(table.columns)}")
    rows: list[dict[str, object]] = []
    table["label"] = map_labels(table["label"], labels, path)
    for record in table.to_dict("records"):
        image = Path(record["path"])
        image = image if image.is_absolute() else (path.parent / image).resolve()
        if not image.is_file():
            raise DataError(path, f"listed image {image} does not exist")
        rows.extend(image_rows(image, record["label"], str(record.get("patient_id", "")).strip(), source or path.stem))
    if not rows:
        raise DataError(path, "CSV lists no images")
    return require_two_classes(new_manifest(rows), path)
