"""Atomic file writes: write a temporary file next to the target, then rename.

A killed process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success."""
    from covidscan.errors import CovidscanError

    target = Path(target)
    if target.is_dir():
        raise CovidscanError(f"{target}: is a folder; give a file name to write")
    if target.parent.exists() and not target.parent.is_dir():
        raise CovidscanError(f"{target.parent}: is a file, not a folder to write {target.name} into")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CovidscanError(f"{target}: cannot create its folder (a file is in the way)") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file ordinary permissions
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_with(target: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `target` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_bytes(target: str | Path, data: bytes) -> Path:
    return write_with(target, lambda tmp: tmp.write_bytes(data))


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def swap_folder(new: str | Path, target: str | Path) -> None:
    """Put the complete folder `new` in place of `target`; killed at any point, a complete folder is left.

    The old folder is renamed aside first (`.<name>.old`), the new one renamed
    in, then the old one deleted. A leftover `.old` from an earlier kill is
    restored when no target exists, else removed.
    """
    import shutil

    new, target = Path(new), Path(target)
    aside = recover_folder(target)
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    if aside.exists():
        shutil.rmtree(aside)


def recover_folder(target: str | Path) -> Path:
    """After a kill between the two renames of `swap_folder`, put the old folder back; return the aside path."""
    target = Path(target)
    aside = target.with_name(f".{target.name}.old")
    if aside.is_dir() and not target.exists():
        os.replace(aside, target)
    return aside


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON object written by `write_json`; a missing, corrupt or non-object file is a one-line error."""
    from covidscan.errors import CovidscanError

    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CovidscanError(f"{path}: file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CovidscanError(f"{path}: not valid JSON ({exc}); re-create it (e.g. `covidscan evaluate` on a run)") from None
    if not isinstance(value, dict):
        raise CovidscanError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
