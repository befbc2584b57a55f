"""The DICOM node's spool: received instances on disk until their study is analysed, answers until delivered.

`incoming/`: one folder per study, one file per instance, both named by a hash
of their UID (no patient field in a path). Files are written atomically
(temporary name, then rename), so a killed node leaves either a whole instance
or none, and a restarted node picks up every study it holds: nothing
acknowledged to a PACS is lost. Bounded by bytes, not by a count of instances:
a sender of huge instances is refused (0xA700, out of resources) when the bound
is reached, and the node's memory holds one instance per association at most.

`outbox/`: the answer of each analysed study (its DICOM objects and a state
file), written before the study's instances are deleted; delivery is retried
with back-off and, after the last attempt, the folder moves to `dead-letter/`
with the reason. A restarted node delivers what the outbox holds without
analysing the study again, and the objects keep their UIDs, so a PACS files
one answer however often it is sent.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from covidscan import atomic
from covidscan.data.study import StudyFiles, folder_study
from covidscan.errors import CovidscanError

DEFAULT_SPOOL_BYTES = 4_000_000_000  # a dozen 300-slice CT studies waiting at once
_SUFFIX = ".dcm"


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
        self.top, self.max_bytes = Path(root), max_bytes
        self.root = self.top / "incoming"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CovidscanError(f"{self.top}: the DICOM spool folder is not writable ({exc.strerror}); give a writable "
                                 f"folder with --spool (in a read-only container: a mounted volume)") from None
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}  # study -> monotonic time its last instance arrived
        self._bytes = 0
        now = time.monotonic()
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for partial in folder.glob(".*.tmp"):
                partial.unlink(missing_ok=True)  # a write cut off by a kill (covidscan.atomic's temporary): never acknowledged
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
            atomic.write_bytes(target, data)
        except Exception:
            with self._lock:
                self._bytes -= len(data) - replaced
            raise
        return key

    def ready(self, idle_s: float) -> list[str]:
        """Studies nothing arrived for in `idle_s` seconds."""
        now = time.monotonic()
        with self._lock:
            return [key for key, since in self._due.items() if now - since >= idle_s]

    def take(self, key: str) -> str:
        """Claim a ready study for analysis: its folder is renamed, so an instance arriving meanwhile starts a new
        study instead of being deleted with this one. Returns the claimed key (pass it to `files`, `remove`)."""
        with self._lock:
            self._due.pop(key, None)
            if "~" in key:  # claimed before a restart: keep its name (its answer may already be in the outbox)
                return key
            claimed = f"{key}~{time.time_ns()}"
            os.replace(self.root / key, self.root / claimed)
            return claimed

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


class Outbox:
    """Answers waiting for delivery (module docstring). Thread-safe enough for one delivering thread."""

    def __init__(self, root: Path, retry_s: float, attempts: int) -> None:
        self.root, self.dead = Path(root) / "outbox", Path(root) / "dead-letter"
        self.retry_s, self.attempts = retry_s, attempts
        self.root.mkdir(parents=True, exist_ok=True)
        self.dead.mkdir(parents=True, exist_ok=True)
        for partial in self.root.glob("*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        for folder in self.root.iterdir():  # a restart (often after the destination was fixed) tries every answer at once
            if (folder / "state.json").is_file():
                state = self.state(folder.name)
                state["next_try"] = time.time()
                atomic.write_json(folder / "state.json", state)

    def has(self, key: str) -> bool:
        return (self.root / key / "state.json").is_file()

    def put(self, key: str, datasets: list[Any], study: str) -> None:
        """Keep a study's answer (atomically: a temporary folder renamed into place)."""
        partial = self.root / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for index, ds in enumerate(datasets):
            ds.save_as(partial / f"{index}.dcm", enforce_file_format=True)
        atomic.write_json(partial / "state.json", {"study": study, "attempts": 0, "next_try": time.time(), "created": time.time()})
        for path in partial.glob("*.dcm"):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(partial, self.root / key)

    def due(self) -> list[str]:
        """Answers whose next try has come (one whose state cannot be read is due too: delivering it sets it aside)."""
        now = time.time()
        return [folder.name for folder in sorted(self.root.iterdir())
                if folder.is_dir() and not folder.name.endswith(".partial") and self._next_try(folder.name) <= now]

    def _next_try(self, key: str) -> float:
        try:
            return float(self.state(key)["next_try"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def state(self, key: str) -> dict[str, Any]:
        return dict(json.loads((self.root / key / "state.json").read_text()))

    def load(self, key: str) -> list[Any]:
        from pydicom import dcmread

        return [dcmread(path) for path in sorted((self.root / key).glob("*.dcm"), key=lambda p: int(p.stem))]

    def delivered(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def failed(self, key: str, reason: str) -> float | None:
        """Record a failed delivery; the seconds until the next try, or None when the answer moved to dead-letter/."""
        state = self.state(key)
        state["attempts"] += 1
        state["last_error"] = reason
        if state["attempts"] >= self.attempts:
            atomic.write_json(self.root / key / "state.json", state)
            os.replace(self.root / key, self.dead / key)
            return None
        delay = self.retry_s * 2 ** (state["attempts"] - 1)
        state["next_try"] = time.time() + delay
        atomic.write_json(self.root / key / "state.json", state)
        return delay

    def bury(self, key: str, reason: str) -> None:
        """Move an answer that cannot even be read (a damaged state or object) to dead-letter/, with the reason."""
        os.replace(self.root / key, self.dead / key)
        atomic.write_text(self.dead / key / "reason.txt", reason + "\n")


class AnsweredLedger:
    """Which studies were answered, with which instances: a study sent again unchanged (same StudyInstanceUID, same
    SOP instances) is recognised and not analysed again. One JSON line per delivered answer in `answered.jsonl`
    (hashes only); the last `keep` are remembered."""

    def __init__(self, root: Path, keep: int = 100_000) -> None:
        self.path, self.keep = Path(root) / "answered.jsonl", keep
        self._seen: dict[str, None] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines()[-keep:]:
                try:
                    self._seen[str(json.loads(line)["signature"])] = None
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut off by a kill

    @staticmethod
    def signature(key: str, instance_names: list[str]) -> str:
        """The study (its spool key without the claim suffix: a hash of the StudyInstanceUID) and its instances."""
        digest = hashlib.sha256(key.split("~")[0].encode())
        for name in sorted(instance_names):
            digest.update(name.encode())
        return digest.hexdigest()[:32]

    def seen(self, signature: str) -> bool:
        return signature in self._seen

    def add(self, signature: str) -> None:
        self._seen[signature] = None
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"signature": signature, "time": time.time()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
