"""Loaders for known public COVID-19 data sets, each aware of its quirks.

- sarscov2-ct (Soares 2020): COVID/ and non-COVID/ folders, no patient IDs.
- ucsd-covid-ct (Yang 2020): CT_COVID/, CT_NonCOVID/, official split lists
  (CRLF), metadata whose file names may lack the extension and whose
  patient IDs are only unique within a source paper.
- ieee8023 (Cohen 2020): metadata CSV with finding, patientid, view.
- kermany-normal: a folder of normal (paediatric) X-rays, patient IM-XXXX.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from covidscan.data.io import is_image_file
from covidscan.data.manifest import new_manifest
from covidscan.data.sources import LabelSet, image_rows, index_csv, index_folder, map_labels, require_two_classes
from covidscan.errors import DataError

Loader = Callable[[Path, LabelSet | None], pd.DataFrame]


def _labelled_manifest(rows: list[dict[str, object]], labels: LabelSet | None, root: Path, empty: str) -> pd.DataFrame:
    """Rows -> manifest with labels mapped onto the label set; no rows is an error."""
    if not rows:
        raise DataError(root, empty)
    frame = new_manifest(rows)
    frame["label"] = map_labels(frame["label"], labels, root)
    return frame


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


# --- SARS-CoV-2 CT-scan -----------------------------------------------------
def load_sarscov2_ct(root: Path, labels: LabelSet | None) -> pd.DataFrame:
    """Class folders without patient IDs: split by similarity cluster, not by patient."""
    frame = index_folder(root, labels if labels is not None else "auto", source="sarscov2-ct", single_class_ok=True)
    frame["modality"] = "CT"
    return frame


# --- UCSD COVID-CT ----------------------------------------------------------
_PAPER = re.compile(r"^(?P<paper>.+?)-p\d+")


def _paper_of(file_name: str) -> str:
    """The source-paper key of a COVID-CT file name ('2020.02.25.20021568-p23-108%11.png')."""
    match = _PAPER.match(file_name)
    return match.group("paper") if match else Path(file_name).stem


def _figure_of(file_name: str) -> str:
    """Fallback patient key: the paper and figure ('2020.02.25.20021568-p23-108')."""
    stem = Path(file_name).stem
    return re.split(r"[%_]", stem)[0]


def _read_split_lists(root: Path) -> dict[str, str]:
    """file name -> official split ('train', 'val', 'test') from Data-split/*/*.txt (CRLF-safe)."""
    official: dict[str, str] = {}
    split_root = root / "Data-split"
    if not split_root.is_dir():
        return official
    for txt in sorted(split_root.rglob("*.txt")):
        name = txt.name.lower()
        part = "train" if name.startswith("train") else "val" if name.startswith("val") else "test" if name.startswith("test") else ""
        if not part:
            continue
        for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                official[line.strip()] = part
    return official


def _covid_patients(root: Path) -> dict[str, str]:
    """file name (with and without extension) -> 'paper/Patient N' from the xlsx metadata."""
    meta_path = root / "Meta" / "COVID-CT-MetaInfo.xlsx"
    if not meta_path.is_file():
        return {}
    try:
        meta = pd.read_excel(meta_path, dtype=str)
    except Exception as exc:
        raise DataError(meta_path, f"cannot read metadata ({exc})") from None
    mapping: dict[str, str] = {}
    for name, pid in zip(meta["File name"].fillna(""), meta["Patient ID"].fillna("")):
        name, pid = name.strip(), pid.strip()
        if name and pid:
            key = f"{_paper_of(name)}/{pid}"
            mapping[name] = key
            mapping[Path(name).stem if Path(name).suffix.lower() in (".png", ".jpg", ".jpeg") else name] = key
    return mapping


def _noncovid_patients(root: Path) -> dict[str, str]:
    meta_path = root / "Meta" / "NonCOVID-CT-MetaInfo.csv"
    if not meta_path.is_file():
        return {}
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    return {str(n).strip(): f"noncovid/{str(p).strip()}" for n, p in zip(meta["image name"], meta["patient id"]) if str(p).strip()}


def load_ucsd_covid_ct(root: Path, labels: LabelSet | None) -> pd.DataFrame:
    official = _read_split_lists(root)
    patients = {"CT_COVID": _covid_patients(root), "CT_NonCOVID": _noncovid_patients(root)}
    rows: list[dict[str, object]] = []
    for folder_name, raw_label in (("CT_COVID", "COVID"), ("CT_NonCOVID", "non-COVID")):
        folder = root / folder_name
        if not folder.is_dir():
            continue
        for image in _images(folder):
            mapping = patients[folder_name]
            pid = mapping.get(image.name) or mapping.get(image.stem)
            if not pid:  # not in the metadata: one figure of one paper is the best guess of a patient
                pid = f"{'figure' if folder_name == 'CT_COVID' else 'noncovid-file'}/{_figure_of(image.name)}"
            for row in image_rows(image, raw_label, pid, "ucsd-covid-ct"):
                row["official_split"] = official.get(image.name, "")
                row["modality"] = "CT"
                rows.append(row)
    return _labelled_manifest(rows, labels, root, "no images under CT_COVID/ or CT_NonCOVID/")


# --- COVID-19 image data collection (ieee8023) -----------------------------
def _finding_class(finding: str) -> str:
    """Collapse the collection's findings to COVID / normal / pneumonia ('' = unlabelled)."""
    text = finding.strip().lower()
    if not text or text in ("todo", "unknown"):
        return ""
    if "covid" in text:
        return "COVID"
    if text == "no finding":
        return "normal"
    return "pneumonia"


def load_ieee8023(root: Path, labels: LabelSet | None) -> pd.DataFrame:
    """Reads index.csv (file, finding, patientid, view) or the collection's metadata.csv; lateral views are left out."""
    table_path = root / "index.csv" if (root / "index.csv").is_file() else root / "metadata.csv"
    if not table_path.is_file():
        raise DataError(root, "no index.csv or metadata.csv with finding/patientid columns")
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    file_column = "file" if "file" in table.columns else "filename"
    missing = {file_column, "finding", "patientid"} - set(table.columns)
    if missing:
        raise DataError(table_path, f"missing column(s) {sorted(missing)}")
    rows: list[dict[str, object]] = []
    from covidscan.data.sources import is_lateral

    for record in table.to_dict("records"):
        finding = _finding_class(record["finding"])
        if not finding:
            continue  # unlabelled ('todo'): counted by the audit through the table, not trained on
        if is_lateral(record.get("view", "")):
            continue  # laterals: another projection than the PA/AP images every X-ray seed trained on
        name = record[file_column]
        image = root / name if (root / name).is_file() else root / "images" / name
        if not image.is_file():
            continue
        for row in image_rows(image, finding, f"ieee8023/{record['patientid']}", "ieee8023"):
            row.update(modality="CXR", view=record.get("view", ""), finding=record["finding"])
            rows.append(row)
    return _labelled_manifest(rows, labels, root, "no labelled images found")


# --- Kermany normal X-rays -------------------------------------------------
_KERMANY = re.compile(r"^(?:NORMAL\d*-)?(IM-\d+)-\d+", re.IGNORECASE)


def load_kermany_normal(root: Path, labels: LabelSet | None) -> pd.DataFrame:
    """A single-class folder of normal (paediatric) X-rays; patient = the IM-XXXX part."""
    rows: list[dict[str, object]] = []
    for image in _images(root):
        match = _KERMANY.match(image.name)
        pid = f"kermany/{match.group(1) if match else image.stem}"
        for row in image_rows(image, "normal", pid, "kermany-normal"):
            row["modality"] = "CXR"
            rows.append(row)
    return _labelled_manifest(rows, labels, root, "no images found")


LOADERS: dict[str, Loader] = {
    "sarscov2-ct": load_sarscov2_ct,
    "ucsd-covid-ct": load_ucsd_covid_ct,
    "ieee8023": load_ieee8023,
    "kermany-normal": load_kermany_normal,
}
KINDS = ("auto", "folder", "csv", *LOADERS)


# The sarscov2-ct release's fingerprint: its file names and class sizes (1,252 COVID, 1,230 non-COVID as published).
_SARSCOV2_NAMES = {"COVID": re.compile(r"^Covid \(\d+\)\.png$"), "non-COVID": re.compile(r"^Non-Covid \(\d+\)\.png$")}
_SARSCOV2_SIZES = {"COVID": 1252, "non-COVID": 1230}
_FINGERPRINT_SHARE = 0.9  # at least this share of the release's files, all named as released


def is_sarscov2_release(root: Path) -> bool:
    """True only for a folder that holds the sarscov2-ct release itself, not any flat COVID/non-COVID tree.

    A hospital's own set (or another public set) arranged as ROOT/COVID + ROOT/non-COVID is the user's data;
    calling it the São Paulo release would misreport its source in the report, the t-SNE panel and the model card.
    """
    for folder, pattern in _SARSCOV2_NAMES.items():
        if not (root / folder).is_dir():
            return False
        entries = list((root / folder).iterdir())
        if any(p.is_dir() for p in entries):
            return False
        images = [p for p in entries if is_image_file(p)]
        if len(images) < _FINGERPRINT_SHARE * _SARSCOV2_SIZES[folder] or not all(pattern.match(p.name) for p in images):
            return False
    return True


def detect_kind(root: Path) -> str:
    """Guess a source's kind from its layout; a known set only when its files match the release's fingerprint."""
    if root.is_file():
        return "csv"
    if (root / "CT_COVID").is_dir() and (root / "CT_NonCOVID").is_dir():
        return "ucsd-covid-ct"
    if (root / "index.csv").is_file() or ((root / "metadata.csv").is_file() and (root / "images").is_dir()):
        return "ieee8023"
    if is_sarscov2_release(root):
        return "sarscov2-ct"
    files = _images(root) if root.is_dir() else []
    if files and sum(bool(_KERMANY.match(f.name)) for f in files) > 0.9 * len(files):
        return "kermany-normal"
    return "folder"


def index_source(
    root: str | Path, kind: str = "auto", labels: LabelSet | str | None = "binary", source: str | None = None,
) -> pd.DataFrame:
    """Index one source (any kind) into a manifest; single-class sources are allowed here.

    `source`: the name the user gives a set of their own (default: the folder or CSV name). A known public set
    keeps its own name: naming it otherwise would detach it from its provenance.
    """
    if isinstance(labels, str):
        labels = LabelSet.parse(labels)
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(root, "data folder does not exist")
    if kind not in KINDS:
        raise DataError(root, f"unknown source kind {kind!r}; choose one of {list(KINDS)}")
    kind = detect_kind(root) if kind == "auto" else kind
    if source is not None and not source.strip():
        raise DataError(root, "--source must not be empty")
    if source is not None and kind in LOADERS:
        raise DataError(root, f"this is the known set {kind!r}; --source names a set of your own (use --kind folder to index it as yours)")
    if kind == "csv":
        return index_csv(root, labels, source=source)
    if kind == "folder":
        return index_folder(root, labels, source=source, single_class_ok=True)
    return LOADERS[kind](root, labels)


def index_sources(
    roots: list[str | Path], kind: str = "auto", labels: LabelSet | str | None = "binary", source: str | None = None,
) -> pd.DataFrame:
    """Index several sources into one manifest: they must hold at least two classes together."""
    if not roots:
        raise DataError("data index", "give at least one data folder or CSV")
    frames = [index_source(root, kind, labels, source) for root in roots]
    frame = new_manifest(pd.concat(frames, ignore_index=True).fillna(""))
    return require_two_classes(frame, ", ".join(str(r) for r in roots))


@dataclass(frozen=True)
class SetDescription:
    """What is known of a data set's origin and reference standard (CLAIM 2024 items 7-9 and 14-17, TRIPOD+AI 6-7).

    Only what the release itself documents; `unknown` says what a reader cannot learn from it.
    """

    description: str
    uncertain: bool | None  # provenance uncertain; None: the user's own data (as documented by its owner)
    label_source: str = "not stated"
    country: str = "not stated"
    period: str = "not stated"
    unknown: str = ""
    known: bool = True

    def to_json(self) -> dict[str, object]:
        return asdict(self)


KNOWN_SETS: dict[str, SetDescription] = {
    "phantom": SetDescription(
        "synthetic chest-CT-like images generated by covidscan (no patients)", False,
        label_source="by construction (the generator draws lesions for the COVID class)", country="none (synthetic)",
        period="generated on demand", unknown="nothing clinical: no patient, scanner or disease is real"),
    "phantom-hospital-b": SetDescription(
        "synthetic phantoms of another simulated scanner (other window and noise), made by `covidscan demo`", False,
        label_source="by construction", country="none (synthetic)", period="generated on demand",
        unknown="nothing clinical: it imitates a change of scanner, not of patients"),
    "sarscov2-ct": SetDescription(
        "public release of CT slices from hospitals in São Paulo (Soares 2020); PNG without scanner metadata or patient IDs", True,
        label_source="the release's two folders (COVID-19 patients vs patients with other pulmonary findings), as stated by its "
                     "authors; the confirming test is not given per image",
        country="Brazil (hospitals in São Paulo)", period="2020 (collection dates not published)",
        unknown="patient IDs, age, sex, scanner, slice thickness, how slices were chosen from each scan"),
    "ucsd-covid-ct": SetDescription(
        "CT images cut from figures of published papers (Yang 2020); copyright with the papers' publishers", True,
        label_source="COVID: the diagnosis reported by the source paper of each figure; non-COVID: images from other sources "
                     "gathered by the data set's authors; not verified against RT-PCR per image",
        country="not recorded per image (papers from several countries)", period="early 2020 (preprints and papers on COVID-19)",
        unknown="age, sex, scanner, window, slice position; images carry figure arrows, letters and borders"),
    "ieee8023": SetDescription(
        "public collection of X-ray/CT images from papers and websites (Cohen 2020)", True,
        label_source="the collection's 'finding' field, taken from the source paper or website",
        country="many (the metadata's location field, where given)", period="2020",
        unknown="how each finding was confirmed; acquisition settings; images were re-encoded by their sources"),
    "kermany-normal": SetDescription(
        "public paediatric chest X-rays (Kermany 2018)", False,
        label_source="graded by physicians for the release (Kermany 2018)", country="China (one children's hospital)",
        period="not stated per image", unknown="these are children: pairing them with adult images lets age decide the class"),
}
DEMOGRAPHIC_COLUMNS = ("age", "sex")


def user_set(description: str = "") -> SetDescription:
    """A set of the user's own: its owner's description, or a statement that none was given."""
    return SetDescription(
        description or "the user's own data set (no description given: `covidscan data index --description`)", None,
        label_source="as documented by the set's owner", known=False,
        unknown="whatever its owner did not document (label source, period, inclusion criteria)")


def describe_source(frame: pd.DataFrame, description: str) -> pd.DataFrame:
    """The manifest with the user's one-line description of their set (column `source_description`)."""
    known = sorted(set(frame["source"].astype(str)) & set(KNOWN_SETS))
    if known:
        raise DataError("--description", f"{known} are known sets with their own description; describe only sets of your own")
    if not description.strip():
        raise DataError("--description", "must not be empty")
    return frame.assign(source_description=" ".join(description.split()))


def set_descriptions(frame: pd.DataFrame) -> dict[str, SetDescription]:
    """Source name -> what is known of it, for every source of a manifest (known sets, then the user's own)."""
    if "source" not in frame.columns:
        return {}
    given = frame.get("source_description", pd.Series([""] * len(frame), index=frame.index)).astype(str)
    out: dict[str, SetDescription] = {}
    for source in sorted(frame["source"].astype(str).unique()):
        texts = sorted({t for t in given[frame["source"].astype(str) == source] if t.strip()})
        out[source] = KNOWN_SETS.get(source) or user_set("; ".join(texts))
    return out


def cannot_check(frame: pd.DataFrame) -> str:
    """What the manifest cannot tell: fairness needs demographic columns."""
    present = [c for c in DEMOGRAPHIC_COLUMNS if c in frame.columns and (frame[c].astype(str).str.strip() != "").any()]
    if len(present) == len(DEMOGRAPHIC_COLUMNS):
        return ""
    missing = [c for c in DEMOGRAPHIC_COLUMNS if c not in present]
    return (f"The data carry no {' or '.join(missing)} column: whether the model performs equally across demographic groups "
            "(fairness) cannot be checked on them.")


def describe_set(frame: pd.DataFrame) -> dict[str, object]:
    """A manifest's data description for a report: each source's origin and reference standard, the columns the
    manifest carries (for a user's set, that is all a reader can go by) and what cannot be checked."""
    hidden = {"path", "patient_id", "group", "split", "slice_index", "fold", "source_description"}
    return {
        "provenance": {source: d.to_json() for source, d in set_descriptions(frame).items()},
        "columns": sorted(c for c in frame.columns if c not in hidden and (frame[c].astype(str).str.strip() != "").any()),
        "cannot_check": cannot_check(frame),
    }
