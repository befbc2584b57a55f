"""Data audit: what is wrong with a data set before any model sees it.

Checks: unreadable files; quality outliers; exact duplicates (identical
pixels) and near duplicates (perceptual hash), within and across classes and
sources; class balance per source and patient; and shortcut risks, i.e. file
properties (mode, format, size, bit depth, source) that predict the label on
their own. A model trained on a data set with such a property can score well
by learning the property instead of the disease.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from covidscan.data.io import read_image
from covidscan.data.manifest import image_refs
from covidscan.errors import CovidscanError, DataError, ImageReadError
from covidscan.progress import track

FILE_PROPERTIES_CATEGORICAL = ("format", "mode", "bit_depth", "size", "source", "modality", "view")
FILE_PROPERTIES_NUMERIC = ("width", "height", "aspect", "file_bytes")
CONTENT_NUMERIC = ("mean", "std")
DROP_KINDS = ("corrupt", "quality", "duplicate", "conflict")
PHASH_SIZE = 16  # 16 x 16 = 256-bit perceptual hash


@dataclass
class AuditThresholds:
    """Where an image or a property becomes a finding. All settable by the user."""

    dark_mean: float = 0.05
    bright_mean: float = 0.95
    low_contrast_std: float = 0.03
    min_side: int = 64
    max_aspect: float = 3.0
    # Hamming distance between 256-bit perceptual hashes. Calibrated on sarscov2-ct:
    # at <= 30 bits no pair crosses classes; 64-bit hashes confuse different patients.
    near_duplicate_bits: int = 30
    shortcut_auc: float = 0.70  # a single property separating classes this well is a warning
    purity: float = 0.95  # a property value that is this pure in one class ...
    purity_min_share: float = 0.05  # ... and covers at least this share of the images


@dataclass
class AuditResult:
    properties: pd.DataFrame  # the manifest plus one column per measured property and `audit_flags`
    summary: dict[str, object] = field(default_factory=dict)


def _measure_one(path: str, slice_index: int | None) -> dict[str, object]:
    try:
        image = read_image(path, slice_index)
    except ImageReadError as exc:
        return {"readable": False, "error": exc.problem}
    pixels = image.pixels
    gray8 = np.round(pixels * 255).astype(np.uint8)
    width, height = int(image.meta["width"]), int(image.meta["height"])
    return {
        "readable": True,
        "error": "",
        "format": image.meta.get("format") or "",
        "mode": image.meta.get("mode") or "",
        "bit_depth": int(image.meta.get("bit_depth") or 0),
        "width": width,
        "height": height,
        "size": f"{width}x{height}",
        "aspect": max(width, height) / max(1, min(width, height)),
        "file_bytes": Path(path).stat().st_size,
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        "pixel_sha256": hashlib.sha256(gray8.tobytes() + f"{width}x{height}".encode()).hexdigest(),
        "phash": str(imagehash.phash(Image.fromarray(gray8), hash_size=PHASH_SIZE)),
    }


def measure_images(frame: pd.DataFrame, show: bool = True) -> pd.DataFrame:
    """The manifest with measured properties added (one image read per row)."""
    measured = [_measure_one(p, s) for p, s in track(image_refs(frame), "auditing images", show)]
    props = pd.DataFrame(measured, index=frame.index)
    out = frame.copy()
    for column in props.columns:
        out[column] = props[column]
    return out


def _quality_flags(row: pd.Series, t: AuditThresholds) -> list[str]:
    if not row["readable"]:
        return []
    flags = []
    if row["mean"] < t.dark_mean:
        flags.append("too dark")
    if row["mean"] > t.bright_mean:
        flags.append("too bright")
    if row["std"] < t.low_contrast_std:
        flags.append("low contrast")
    if min(row["width"], row["height"]) < t.min_side:
        flags.append("tiny")
    if row["aspect"] > t.max_aspect:
        flags.append("extreme aspect ratio")
    return flags


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint16)


def near_duplicate_pairs(hexes: list[str], max_bits: int) -> np.ndarray:
    """All index pairs (i < j) whose perceptual hashes differ in at most `max_bits` bits."""
    if not hexes:
        return np.zeros((0, 2), int)
    codes = np.array([np.frombuffer(bytes.fromhex(h), np.uint8) for h in hexes])  # (N, bytes)
    chunk = max(1, 64_000_000 // max(1, codes.size))  # bound the (chunk, N, bytes) block to ~64 MB
    pairs = []
    for start in range(0, len(codes), chunk):
        block = codes[start : start + chunk]
        distance = _POPCOUNT[block[:, None, :] ^ codes[None, :, :]].sum(-1)
        i, j = np.nonzero(distance <= max_bits)
        i = i + start
        keep = i < j
        pairs.append(np.stack([i[keep], j[keep]], 1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), int)


def _categorical_auc(values: pd.Series, y: np.ndarray) -> float:
    """Out-of-fold AUC of predicting y from one categorical value (target encoding)."""
    if values.nunique() < 2 or len(np.unique(y)) < 2 or min(np.bincount(y)) < 5:
        return 0.5
    score = np.zeros(len(y))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    values = values.astype(str).to_numpy()
    for train, test in folds.split(values, y):
        rates = pd.Series(y[train]).groupby(values[train]).mean()
        score[test] = pd.Series(values[test]).map(rates).fillna(y[train].mean()).to_numpy()
    return float(roc_auc_score(y, score))


def _numeric_auc(values: pd.Series, y: np.ndarray) -> float:
    """AUC of a one-feature threshold rule, in whichever direction separates better."""
    if values.nunique() < 2 or len(np.unique(y)) < 2:
        return 0.5
    auc = float(roc_auc_score(y, values.astype(float)))
    return max(auc, 1.0 - auc)


def shortcut_risks(props: pd.DataFrame, t: AuditThresholds) -> list[dict[str, object]]:
    """How well each property alone separates each class from the rest (best class reported)."""
    readable = props[props["readable"]]
    classes = sorted(readable["label"].unique())
    targets = classes[1:] if len(classes) == 2 else classes  # one-vs-rest; binary needs one side
    risks = []
    features = [(c, "categorical", "file") for c in FILE_PROPERTIES_CATEGORICAL]
    features += [(c, "numeric", "file") for c in FILE_PROPERTIES_NUMERIC]
    features += [(c, "numeric", "content") for c in CONTENT_NUMERIC]
    for name, kind, origin in features:
        if name not in readable.columns or readable[name].astype(str).replace("", np.nan).dropna().empty:
            continue
        values = readable[name]
        best_auc, best_class = 0.5, ""
        for cls in targets:
            y = (readable["label"] == cls).to_numpy().astype(int)
            auc = _categorical_auc(values, y) if kind == "categorical" else _numeric_auc(values, y)
            if auc > best_auc:
                best_auc, best_class = auc, cls
        rules = _purity_rules(readable, name, t) if kind == "categorical" else []
        warn = origin == "file" and (best_auc >= t.shortcut_auc or bool(rules))
        risks.append({
            "property": name, "kind": kind, "origin": origin, "auc": round(best_auc, 4), "class": best_class,
            "distinct_values": int(values.astype(str).nunique()), "rules": rules, "warning": warn,
        })
    return sorted(risks, key=lambda r: (-int(bool(r["warning"])), -float(r["auc"])))  # type: ignore[arg-type]


def _purity_rules(readable: pd.DataFrame, name: str, t: AuditThresholds) -> list[dict[str, object]]:
    """Property values that occur (almost) only in one class and cover a real share of the data."""
    rules = []
    min_count = max(10, int(t.purity_min_share * len(readable)))
    shares = readable.groupby(readable[name].astype(str))["label"].value_counts(normalize=False).unstack(fill_value=0)
    if len(shares) < 2:
        return rules
    for value, counts in shares.iterrows():
        total = int(counts.sum())
        if total < min_count:
            continue
        top = str(counts.idxmax())
        purity = counts.max() / total
        if purity >= t.purity:
            rules.append({"value": str(value), "class": top, "images": total, "purity": round(float(purity), 4)})
    return rules


def _duplicate_groups(props: pd.DataFrame) -> list[list[int]]:
    readable = props[props["readable"]]
    groups = readable.groupby("pixel_sha256").groups
    return [sorted(int(i) for i in idx) for idx in groups.values() if len(idx) > 1]


def run_audit(frame: pd.DataFrame, thresholds: AuditThresholds | None = None, show: bool = True) -> AuditResult:
    """Measure every image, flag problems, and summarise the data set."""
    t = thresholds or AuditThresholds()
    started = time.perf_counter()
    props = measure_images(frame.reset_index(drop=True), show)
    if len(props) and not props["readable"].any():  # nothing to measure: say why instead of failing on a missing column
        reasons = props["error"].astype(str).value_counts()
        raise DataError(str(props.at[0, "path"]), f"none of the {len(props)} images could be read; "
                        + "; ".join(f"{count} x {reason}" for reason, count in reasons.head(3).items()))
    flags: list[list[str]] = [[] for _ in range(len(props))]
    for i, row in props.iterrows():
        if not row["readable"]:
            flags[int(i)].append("corrupt")
        elif quality := _quality_flags(row, t):
            flags[int(i)].append("quality:" + ",".join(quality))

    duplicate_groups = []
    for group in _duplicate_groups(props):
        labels = sorted(props.loc[group, "label"].unique())
        conflict = len(labels) > 1
        for k, i in enumerate(group):
            if conflict:
                flags[i].append("conflict:duplicate across classes")
            elif k > 0:
                flags[i].append("duplicate")
        patients = sorted(p for p in props.loc[group, "patient_id"].astype(str).unique() if p)
        duplicate_groups.append({
            "paths": props.loc[group, "path"].tolist(), "labels": labels,
            "sources": sorted(props.loc[group, "source"].unique()), "cross_class": conflict,
            "patients": patients, "cross_patient": len(patients) > 1,
        })

    readable_index = props.index[props["readable"]].to_numpy()
    pairs = near_duplicate_pairs(props.loc[readable_index, "phash"].tolist(), t.near_duplicate_bits)
    pairs = readable_index[pairs] if len(pairs) else pairs
    near = []
    for i, j in pairs:
        if props.at[i, "pixel_sha256"] == props.at[j, "pixel_sha256"]:
            continue  # already an exact duplicate
        cross_class = props.at[i, "label"] != props.at[j, "label"]
        if cross_class:
            flags[int(i)].append("conflict:near duplicate across classes")
            flags[int(j)].append("conflict:near duplicate across classes")
        near.append((int(i), int(j), bool(cross_class), props.at[i, "source"] != props.at[j, "source"]))

    props["audit_flags"] = [";".join(sorted(set(f))) for f in flags]
    patients = props[props["patient_id"] != ""]
    risks = shortcut_risks(props, t)
    summary: dict[str, object] = {
        "images": len(props),
        "readable": int(props["readable"].sum()),
        "thresholds": asdict(t),
        "classes": props["label"].value_counts().to_dict(),
        "by_source": {f"{s} / {c}": int(n) for (s, c), n in props.groupby(["source", "label"]).size().items()},
        "patients": {
            "with_id": int(len(patients)),
            "without_id": int(len(props) - len(patients)),
            "per_class": patients.groupby("label")["patient_id"].nunique().to_dict(),
            "images_per_patient": patients.groupby("patient_id").size().describe().round(2).to_dict() if len(patients) else {},
        },
        "corrupt": props.loc[~props["readable"], ["path", "error"]].to_dict("records"),
        "quality_outliers": props.loc[props["audit_flags"].str.contains("quality"), ["path", "label", "audit_flags"]].to_dict("records"),
        "exact_duplicates": duplicate_groups,
        "near_duplicates": {
            "max_hamming_bits": t.near_duplicate_bits,
            "pairs": len(near),
            "within_class": sum(1 for p in near if not p[2]),
            "across_classes": sum(1 for p in near if p[2]),
            "across_sources": sum(1 for p in near if p[3]),
            "images_involved": len({k for p in near for k in p[:2]}),
            "examples_across_classes": [[props.at[i, "path"], props.at[j, "path"]] for i, j, c, _ in near if c][:20],
        },
        "shortcut_risks": risks,
        "warnings": _warnings(props, risks, duplicate_groups, near),
        "flag_counts": pd.Series([f.split(":")[0] for fl in flags for f in set(fl)]).value_counts().to_dict() if any(flags) else {},
        "seconds": 0.0,
    }
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return AuditResult(props, summary)


def _warnings(props: pd.DataFrame, risks: list[dict[str, object]], dups: list[dict[str, object]], near: list[tuple[int, int, bool, bool]]) -> list[str]:
    out = []
    for risk in risks:
        if not risk["warning"]:
            continue
        rules = "; ".join(f"{r['value'] or '(missing)'} -> {r['class']} in {r['purity']:.0%} of {r['images']} images" for r in risk["rules"][:3])  # type: ignore[index]
        out.append(
            f"SHORTCUT RISK: file property '{risk['property']}' alone predicts the label (AUC {risk['auc']:.2f})"
            + (f"; {rules}" if rules else "")
            + ". A model can learn this instead of the disease: harmonise or stratify it, or evaluate on another source."
        )
    bad = int((~props["readable"]).sum())
    if bad:
        out.append(f"{bad} unreadable image(s)")
    cross = sum(1 for d in dups if d["cross_class"])
    if dups:
        cross_patient = sum(1 for d in dups if d["cross_patient"])
        out.append(
            f"{len(dups)} group(s) of identical images ({cross} with conflicting labels, {cross_patient} "
            "under different patient IDs: a patient split cannot keep those apart)"
        )
    if any(p[2] for p in near):
        out.append(f"{sum(1 for p in near if p[2])} near-duplicate pair(s) across classes")
    if any(p[3] for p in near) or any(len(d["sources"]) > 1 for d in dups):  # type: ignore[arg-type]
        out.append("duplicates across data sets: merged collections leak the same image into train and test")
    return out


def drop_flagged(props: pd.DataFrame, kinds: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows without flags of the given kinds, and how many were dropped per kind."""
    unknown = sorted(set(kinds) - set(DROP_KINDS))
    if unknown:
        raise CovidscanError(f"--drop: unknown kind(s) {unknown}; choose from {list(DROP_KINDS)}")
    drop = np.zeros(len(props), bool)
    counts: dict[str, int] = {}
    flag_kinds = props["audit_flags"].fillna("").map(lambda s: {f.split(":")[0] for f in s.split(";") if f})
    for kind in kinds:
        hit = flag_kinds.map(lambda k: kind in k).to_numpy()
        counts[kind] = int((hit & ~drop).sum())
        drop |= hit
    return props.loc[~drop].reset_index(drop=True), counts


@dataclass(frozen=True)
class AuditFindings:
    """What the audit of a training manifest found, as the run's report and model card state it.

    The full audit (every image's properties) is written to the run folder's audit.json; this is its verdict.
    """

    images: int
    flagged_images: int
    warnings: tuple[str, ...]
    shortcuts: tuple[tuple[str, float, str], ...]  # (property, one-property AUC, class it predicts), warned ones only
    exact_duplicate_groups: int
    conflicts: int  # images flagged as duplicates across classes
    seconds: float

    @classmethod
    def of(cls, result: AuditResult) -> AuditFindings:
        summary = result.summary
        risks = summary.get("shortcut_risks") or []
        assert isinstance(risks, list)
        flags = result.properties["audit_flags"].astype(str)
        return cls(
            images=int(len(result.properties)),
            flagged_images=int((flags != "").sum()),
            warnings=tuple(str(w) for w in summary.get("warnings") or []),  # type: ignore[union-attr]
            shortcuts=tuple((str(r["property"]), float(r["auc"]), str(r["class"])) for r in risks if r["warning"]),
            exact_duplicate_groups=len(summary.get("exact_duplicates") or []),  # type: ignore[arg-type]
            conflicts=int(flags.str.contains("conflict").sum()),
            seconds=float(summary.get("seconds", 0.0)),  # type: ignore[arg-type]
        )

    def to_json(self) -> dict[str, object]:
        return {"checked": True, "images": self.images, "flagged_images": self.flagged_images, "warnings": list(self.warnings),
                "shortcuts": [{"property": p, "auc": a, "class": c} for p, a, c in self.shortcuts],
                "exact_duplicate_groups": self.exact_duplicate_groups, "conflicts": self.conflicts, "seconds": self.seconds,
                "file": "audit.json"}


NOT_AUDITED = {"checked": False, "note": "the audit was skipped (--no-audit): shortcuts, duplicates and label conflicts were not checked"}
