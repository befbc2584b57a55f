"""The Manifest: one row per image, the object every stage reads and writes.

Columns (required first): `path`, `label`, then `patient_id`, `group`,
`source`, `split`, `slice_index` (the slice of a volume file; empty for 2-D
images), plus any stage-specific extras. Paths are absolute so a
manifest copied into a run folder still points at its images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidscan import atomic
from covidscan.errors import DataError

REQUIRED_COLUMNS = ("path", "label")
STANDARD_COLUMNS = ("path", "label", "patient_id", "group", "source", "split", "slice_index")
SPLITS = ("train", "val", "test")


def new_manifest(rows: list[dict[str, object]] | pd.DataFrame) -> pd.DataFrame:
    """Build a manifest from row dicts (or a frame), filling the standard columns."""
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    for column in STANDARD_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    ordered = list(STANDARD_COLUMNS) + [c for c in frame.columns if c not in STANDARD_COLUMNS]
    return frame[ordered].reset_index(drop=True)


def validate_manifest(frame: pd.DataFrame, where: str | Path = "manifest") -> pd.DataFrame:
    """Check the columns and values every stage relies on; return the frame."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(where, f"manifest lacks column(s) {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise DataError(where, "manifest has no rows")
    if frame["path"].isna().any() or (frame["path"].astype(str) == "").any():
        raise DataError(where, "manifest has rows without a path")
    if frame["label"].isna().any() or (frame["label"].astype(str) == "").any():
        raise DataError(where, "manifest has rows without a label")
    if "split" in frame.columns:
        bad = sorted(set(frame["split"].astype(str)) - set(SPLITS) - {""})
        if bad:
            raise DataError(where, f"unknown split value(s) {bad}; allowed: {list(SPLITS)}")
    if "slice_index" in frame.columns:
        values = frame["slice_index"].astype(str).str.strip()
        bad_rows = [i for i, v in enumerate(values) if v not in ("", "nan") and not (v.isdigit() or (v.endswith(".0") and v[:-2].isdigit()))]
        if bad_rows:
            raise DataError(where, f"slice_index must be empty or a whole number >= 0; row {bad_rows[0] + 2} has {values.iloc[bad_rows[0]]!r}")
    return frame


def save_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the manifest as CSV, atomically."""
    validate_manifest(frame, path)
    return atomic.write_with(path, lambda tmp: frame.to_csv(tmp, index=False))


def read_csv_table(path: str | Path, what: str = "CSV") -> pd.DataFrame:
    """Read a CSV as strings (empty cells stay empty); errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file does not exist")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable {what} ({exc})") from None


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest CSV. Empty cells read as empty strings."""
    frame = read_csv_table(path, "manifest CSV")
    return new_manifest(validate_manifest(frame, path))


def class_names(frame: pd.DataFrame) -> list[str]:
    """The label set of a manifest, in a stable order (sorted)."""
    return sorted(frame["label"].astype(str).unique())


def image_refs(frame: pd.DataFrame) -> list[tuple[str, int | None]]:
    """(path, slice index or None) per row: what `read_image` needs."""
    slices = frame["slice_index"].astype(str) if "slice_index" in frame.columns else pd.Series([""] * len(frame))
    return [(str(p), int(float(s)) if s not in ("", "nan") else None) for p, s in zip(frame["path"], slices)]


def unit_keys(frame: pd.DataFrame) -> np.ndarray:
    """Each row's independent unit: its split group, else its patient, else the image itself.

    A split given in the manifest (e.g. UCSD's official lists) has no group column: counting its empty groups
    would report every part as one patient.
    """
    def column(name: str) -> np.ndarray:
        return frame[name].astype(str).str.strip().to_numpy() if name in frame.columns else np.full(len(frame), "")

    group, patient = column("group"), column("patient_id")
    image = np.array([f"image-{i}" for i in range(len(frame))], dtype=object)
    return np.where(group != "", "group:" + group.astype(object), np.where(patient != "", "patient:" + patient.astype(object), image))


def part_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images and independent units (patients or groups) per split part: the one count the card, report and CLI state."""
    units = unit_keys(frame)
    split = frame["split"].astype(str).to_numpy() if "split" in frame.columns else np.full(len(frame), "")
    return {part: {"images": int((split == part).sum()), "patients_or_groups": int(len(np.unique(units[split == part])))}
            for part in SPLITS}
