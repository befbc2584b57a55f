"""What a run was trained on, without patient IDs: counts per source, class and split part, the data description and
the audit's verdict (metrics.json "data", the model card's training data)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from covidscan import atomic
from covidscan.data.audit import NOT_AUDITED, AuditFindings, run_audit
from covidscan.data.manifest import part_counts
from covidscan.data.public_sets import describe_set


def training_modality(frame: pd.DataFrame) -> str:
    """'CT' or 'CXR' when every image of the manifest has that modality, else '' (unknown or mixed).
    The service routes uploads to a model by it (serve/router.py)."""
    if "modality" not in frame.columns:
        return ""
    values = set(frame["modality"].astype(str).str.strip().str.upper())
    return values.pop() if len(values) == 1 and values <= {"CT", "CXR"} else ""


def audit_training_data(frame: pd.DataFrame, run_dir: Path, show: bool, log: Callable[[str], None]) -> AuditFindings:
    """The data audit of a training manifest (shortcuts, duplicates, label conflicts), made before training.

    Every image is read once (9 s for sarscov2-ct's 2,481 slices on 2 cores, BENCHMARKS.md), against minutes of
    training, so the whole audit runs; its summary is written to RUN/audit.json.
    """
    result = run_audit(frame, show=show)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(run_dir / "audit.json", result.summary)
    findings = AuditFindings.of(result)
    log(f"data audit: {findings.flagged_images} of {findings.images} images flagged, {len(findings.warnings)} warning(s) ({findings.seconds:.1f} s)")
    for warning in findings.warnings:
        log(f"  audit: {warning}")
    return findings


def training_audit(frame: pd.DataFrame, audit: AuditFindings | bool, run_dir: Path, show: bool, log: Callable[[str], None]) -> dict[str, object]:
    """The audit's verdict as metrics.json and the model card record it: run now (True), skipped (False, stated),
    or the findings of an audit made once for several runs (folds, ensemble members)."""
    if audit is False:
        log("data audit skipped (--no-audit)")
        return dict(NOT_AUDITED)
    findings = audit if isinstance(audit, AuditFindings) else audit_training_data(frame, run_dir, show, log)
    return findings.to_json()


def data_summary(frame: pd.DataFrame, audit: dict[str, object] | None = None) -> dict[str, object]:
    """Provenance without patient IDs: images and patients per source, class and split, and the audit's verdict."""
    counts = frame.groupby(["source", "label"]).size() if "source" in frame.columns else frame.groupby("label").size()
    patients = frame.loc[frame["patient_id"].astype(str) != "", "patient_id"].astype(str).nunique()
    summary: dict[str, object] = {
        "images": int(len(frame)),
        "patients_known": int(patients),
        "images_without_patient_id": int((frame["patient_id"].astype(str) == "").sum()),
        "by_source_and_class": {" / ".join(map(str, k)) if isinstance(k, tuple) else str(k): int(v) for k, v in counts.items()},
    }
    summary["modality"] = training_modality(frame)
    if "split" in frame.columns and (frame["split"].astype(str) != "").any():
        summary["by_split"] = part_counts(frame)
    summary.update(describe_set(frame))
    summary["audit"] = audit or {"checked": False, "note": "the data were not audited with this run (`covidscan audit`)"}
    return summary
