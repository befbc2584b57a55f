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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CovidscanError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CovidscanError(f"{path}: not a model card (expected a JSON object, got {type(raw).__name__})")
    try:
        calibration = raw.get("calibration") or {}
        card = ModelCard(
            raw=raw,
            classes=[str(c) for c in raw["classes"]],
            size=int(raw["image_size"]),
            threshold=float(raw.get("threshold", 0.5)),
            temperature=float(calibration.get("temperature", 1.0)),
        )
    except KeyError as exc:
        raise CovidscanError(f"{path}: not a model card (no {exc.args[0]!r} field)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise CovidscanError(f"{path}: malformed model card ({exc})") from None
    if len(card.classes) < 2 or not 8 <= card.size <= 4096 or not (card.temperature > 0 and 0 <= card.threshold <= 1):
        raise CovidscanError(f"{path}: malformed model card (classes {card.classes}, image_size {card.size}, "
                             f"threshold {card.threshold}, temperature {card.temperature})")
    return card
