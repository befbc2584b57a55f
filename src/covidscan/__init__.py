"""covidscan: COVID-19 detection on chest CT/X-ray, evaluated without patient leakage.

Decision support only: covidscan's outputs are not a diagnosis.
"""
from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = (
    "Decision support only, not a diagnosis: a clinician must review every result."
)

# ONNX Runtime writes a device ID and a telemetry database under the user's home
# unless this is set before it is imported; covidscan never sends or keeps telemetry.
import os as _os

_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
