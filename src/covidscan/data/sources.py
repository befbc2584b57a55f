"""Turn image folders into a Manifest.

Layouts: `ROOT/<class>/<image>` and `ROOT/<class>/<patient>/<image>` (any
depth below the patient folder). Class folder names map onto a label set
case-insensitively, ignoring punctuation ("CT_COVID", "covid-19" -> COVID).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidscan.data.io import is_image_file
from covidscan.data.manifest import new_manifest
from covidscan.errors import DataError

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


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_folder(root: str | Path, labels: LabelSet | str = "binary", source: str | None = None) -> pd.DataFrame:
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
            rows.append(
                {
                    "path": str(image),
                    "label": label,
                    "patient_id": parts[0] if len(parts) > 1 else "",
                    "source": source or root.name,
                }
            )
    if unmapped and labels is not None:
        raise DataError(
            root,
            f"class folder(s) {unmapped} match no class of the label set {list(labels.classes)}; "
            "declare them with --labels (e.g. --labels 'COVID=covid;non-COVID=normal,pneumonia') or use --labels auto",
        )
    if not rows:
        raise DataError(root, "no images found; expected ROOT/<class>/<image> or ROOT/<class>/<patient>/<image> (PNG/JPEG)")
    frame = new_manifest(rows)
    found = sorted(frame["label"].unique())
    if len(found) < 2:
        raise DataError(root, f"only one class ({found[0]}) found; a classifier needs at least two class folders")
    return frame
