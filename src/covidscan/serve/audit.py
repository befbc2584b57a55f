"""One JSON line per analysis, from the web service and the DICOM node, on the `covidscan.audit` logger.

What a hospital's audit asks: when, which study (a keyed hash: the installation's secret over the
StudyInstanceUID, or a hash of the uploaded files' content), which model and version, what answer at which
operating point, how many slices were refused, how long it took. Never a patient field.
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("covidscan.audit")


def audit_analysis(source: str, study: str, model: str, version: str, answer: str, probability: float | None,
                   operating_point: str, slices: int, refused: int, seconds: float) -> None:
    """Log one analysis as a JSON line (module docstring)."""
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": "analysis", "source": source, "study": study,
        "model": model, "model_version": version, "answer": answer,
        "probability": None if probability is None else round(float(probability), 4),
        "operating_point": operating_point, "slices": slices, "refused": refused, "seconds": round(seconds, 3),
    }
    log.info(json.dumps(record))
