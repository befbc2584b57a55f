"""Download logic tested offline through file:// URLs: checksums recorded, then enforced; no zip-slip."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from covidscan.data.download import download
from covidscan.errors import CovidscanError


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_download_records_then_enforces_the_checksum(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"set/COVID/x.png": b"1"})
    folder = download("myset", tmp_path / "data", archive.as_uri())
    assert (folder / "set" / "COVID" / "x.png").read_bytes() == b"1"
    assert "myset" in (tmp_path / "data" / "CHECKSUMS.json").read_text()
    download("myset", tmp_path / "data", archive.as_uri())  # same bytes: fine
    _zip(archive, {"set/COVID/x.png": b"tampered"})
    with pytest.raises(CovidscanError, match="does not match"):
        download("myset", tmp_path / "data", archive.as_uri())


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "evil.zip", {"../../escaped.txt": b"x"})
    with pytest.raises(CovidscanError, match="outside"):
        download("evil", tmp_path / "data", archive.as_uri())
    assert not (tmp_path / "escaped.txt").exists()


def test_unknown_name_and_unreachable_url(tmp_path: Path) -> None:
    with pytest.raises(CovidscanError, match="known"):
        download("nope", tmp_path)
    with pytest.raises(CovidscanError, match="cannot download"):
        download("x", tmp_path, (tmp_path / "missing.zip").as_uri())
