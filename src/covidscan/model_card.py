"""The model card (model.json) that a run folder and an exported bundle both carry.

One reader for the PyTorch predictor and the torch-free service, so the two
never disagree on labels, input size, threshold or temperature.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from covidscan.errors import CovidscanError


@dataclass(frozen=True)
class ModelCard:
    raw: dict[str, object]  # everything model.json holds
    classes: list[str]
    size: int
    threshold: float
    temperature: float  # fitted on validation; 1.0 when the run was not calibrated


def read_model_card(path: Path, missing: str) -> ModelCard:
    """Parse model.json; `missing` is the one-line message when the file is absent."""
    if not path.is_file():
        raise CovidscanError(missing)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CovidscanError(f"{path}: not valid JSON ({exc})") from None
    calibration = raw.get("calibration") or {}
    return ModelCard(
        raw=raw,
        classes=[str(c) for c in raw["classes"]],
        size=int(raw["image_size"]),
        threshold=float(raw.get("threshold", 0.5)),
        temperature=float(calibration.get("temperature", 1.0)),
    )
