"""The torch-free service. Shared defaults live here so the CLI can show them without importing FastAPI."""
from __future__ import annotations

DEFAULT_MAX_UPLOAD_MB = 400.0  # a 300-slice study of uncompressed 512 x 512 DICOM is about 160 MB
