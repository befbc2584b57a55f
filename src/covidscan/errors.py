"""One family of user-facing errors.

The CLI catches `CovidscanError` and prints its message on one line with a
non-zero exit; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re
from pathlib import Path


class CovidscanError(Exception):
    """An error caused by the user's input or environment, explained in one line."""


class DataError(CovidscanError):
    """A data folder, manifest or label set that cannot be used."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ImageReadError(DataError):
    """An image file that cannot be read (corrupt, empty, truncated, not an image, too large)."""


class ConfigError(CovidscanError):
    """A configuration file or override that is invalid."""


class WeightsError(CovidscanError):
    """Pretrained weights that cannot be found or do not fit the model."""


_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")


def exception_summary(exc: BaseException, limit: int = 160) -> str:
    """An exception's type and message with every quoted value blanked: third-party parsers (pydicom) quote the
    offending element's value, which may be a patient's name or ID, and this text reaches answers and logs."""
    message = _QUOTED.sub("'…'", str(exc)).strip()
    return f"{type(exc).__name__}: {message[:limit]}" if message else type(exc).__name__
