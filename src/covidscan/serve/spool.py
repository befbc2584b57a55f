"""The DICOM node's spool: received instances on disk until their study is answered.

One folder per study, one file per instance, both named by a hash of their UID
(no patient field in a path). Files are written atomically (temporary name,
then rename), so a killed node leaves either a whole instance or none, and a
restarted node picks up every study it holds: nothing acknowledged to a PACS is
lost. The spool is bounded by bytes, not by a count of instances: a sender of
huge instances is refused (0xA700, out of resources) when the bound is reached,
and the node's memory holds one instance per association at most.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from covidscan.data.study import StudyFiles, folder_study
from covidscan.errors import CovidscanError

DEFAULT_SPOOL_BYTES = 4_000_000_000  # a dozen 300-slice CT studies waiting at once
_SUFFIX, _PARTIAL = ".dcm", ".partial"


class SpoolFull(CovidscanError):
    """Accepting the instance would pass the spool's byte bound."""


def default_spool_dir() -> Path:
    """$XDG_CACHE_HOME/covidscan/dicom-spool (default ~/.cache/...)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "covidscan" / "dicom-spool"


def _hashed(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:24]


class Spool:
    """Studies waiting on disk (module docstring); thread-safe. A study is ready when nothing arrived for `idle_s`."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_SPOOL_BYTES) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CovidscanError(f"{self.root}: the DICOM spool folder is not writable ({exc.strerror}); give a writable "
                                 f"folder with --spool (in a read-only container: a mounted volume)") from None
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}  # study -> monotonic time it became idle (or its next retry)
        self._bytes = 0
        now = time.monotonic()
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for partial in folder.glob(f"*{_PARTIAL}"):
                partial.unlink(missing_ok=True)  # a write cut off by a kill: never acknowledged
            sizes = [p.stat().st_size for p in folder.glob(f"*{_SUFFIX}")]
            if sizes:
                self._due[folder.name], self._bytes = now, self._bytes + sum(sizes)
            else:
                folder.rmdir()

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def studies(self) -> list[str]:
        with self._lock:
            return list(self._due)

    def add(self, study_uid: str, instance_uid: str, data: bytes) -> str:
        """Store one instance (atomically); returns the study's spool key. Raises SpoolFull past the byte bound.
        The same instance sent twice is stored once."""
        key = _hashed(study_uid)
        folder = self.root / key
        target = folder / f"{_hashed(instance_uid)}{_SUFFIX}"
        with self._lock:
            replaced = target.stat().st_size if target.exists() else 0
            if self._bytes - replaced + len(data) > self.max_bytes:
                raise SpoolFull(f"spool holds {self._bytes / 1e6:,.0f} MB of instances waiting; the bound is {self.max_bytes / 1e6:,.0f} MB")
            self._bytes += len(data) - replaced
            self._due[key] = time.monotonic()
        try:
            folder.mkdir(exist_ok=True)
            partial = target.with_name(f"{target.name}.{threading.get_ident()}{_PARTIAL}")
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        except OSError:
            with self._lock:
                self._bytes -= len(data) - replaced
            raise
        return key

    def ready(self, idle_s: float) -> list[str]:
        """Studies nothing arrived for in `idle_s` seconds (and not waiting for a retry)."""
        now = time.monotonic()
        with self._lock:
            return [key for key, since in self._due.items() if now - since >= idle_s]

    def take(self, key: str) -> str:
        """Claim a ready study for analysis: its folder is renamed, so an instance arriving meanwhile starts a new
        study instead of being deleted with this one. Returns the claimed key (pass it to `files`, `remove`)."""
        with self._lock:
            self._due.pop(key, None)
            claimed = f"{key.split('~')[0]}~{time.time_ns()}"
            os.replace(self.root / key, self.root / claimed)
            return claimed

    def retry_later(self, key: str, delay_s: float) -> None:
        """Keep a claimed study and offer it again after `delay_s` (its answer could not be delivered)."""
        with self._lock:
            self._due[key] = time.monotonic() + delay_s

    def files(self, key: str) -> StudyFiles:
        """The study's instances, read from disk when asked."""
        return folder_study(self.root / key)

    def first_file(self, key: str) -> Path | None:
        return next(iter(sorted((self.root / key).glob(f"*{_SUFFIX}"))), None)

    def remove(self, key: str) -> None:
        """Forget an answered (or unanswerable) study and free its bytes."""
        folder = self.root / key
        freed = 0
        for path in folder.glob("*"):
            freed += path.stat().st_size if path.suffix == _SUFFIX else 0
            path.unlink(missing_ok=True)
        if folder.exists():
            folder.rmdir()
        with self._lock:
            self._due.pop(key, None)
            self._bytes -= freed
