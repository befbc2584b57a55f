"""covidscan: COVID-19 detection on chest CT/X-ray, evaluated without patient leakage.

Decision support only: covidscan's outputs are not a diagnosis.
"""
from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = (
    "Decision support only, not a diagnosis: a clinician must review every result."
)
