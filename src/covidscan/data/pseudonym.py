"""Pseudonymous patient keys: HMAC-SHA256 of the DICOM PatientID under a per-installation secret.

A fixed, public salt lets anyone recover a short MRN from its key by trying
every candidate (an 8-digit MRN took one second). A secret key made once per
installation with `secrets` cannot be brute-forced without the key file, which
never goes into a manifest, a report, a log or a bundle.

Where the secret lives: $COVIDSCAN_SECRET_FILE if set, else
$XDG_CONFIG_HOME/covidscan/patient-key.secret (default ~/.config/...). Machines
that must produce the same keys (e.g. one site indexing on two machines) copy
that file; anyone who holds it can test guesses, so keep it like a password.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

from covidscan.errors import CovidscanError

SECRET_BYTES = 32


def secret_path() -> Path:
    explicit = os.environ.get("COVIDSCAN_SECRET_FILE")
    if explicit:
        return Path(explicit)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "covidscan" / "patient-key.secret"


@lru_cache(maxsize=4)
def _secret(path: Path) -> bytes:
    """The installation's secret, created (0600, atomically) on first use."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(SECRET_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # never replaces a secret another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_bytes()
    if len(secret) < 16:
        raise CovidscanError(f"{path}: patient-key secret is too short ({len(secret)} bytes); delete it to make a new one")
    return secret


def patient_key(patient_id: str) -> str:
    """A stable pseudonymous key for one installation; never the ID itself."""
    digest = hmac.new(_secret(secret_path()), patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"pk-{digest[:16]}"


def study_key(study_instance_uid: str) -> str:
    """A stable pseudonymous key of a study (the same secret, another namespace): what audit lines name it by."""
    digest = hmac.new(_secret(secret_path()), f"study:{study_instance_uid}".encode("utf-8"), hashlib.sha256).hexdigest()
    return f"sk-{digest[:16]}"
