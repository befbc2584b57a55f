"""Fetch public data sets from their original sources, for online users only.

Never used by tests or the demo (they run offline). Every archive's SHA-256
is checked against a pinned value when we have one; otherwise it is recorded
in `CHECKSUMS.json` next to the data on first download (trust on first use)
and every later download must match it. Archives are extracted with a guard
against paths that escape the target folder.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from covidscan import atomic
from covidscan.errors import CovidscanError


@dataclass(frozen=True)
class RemoteSet:
    name: str
    url: str | None  # a direct archive URL, or None for Kaggle-only sets
    kaggle: str | None = None  # "owner/dataset" slug, via the Kaggle API when a token is configured
    sha256: str | None = None  # pinned archive checksum, when known
    citation: str = ""


REMOTE_SETS: dict[str, RemoteSet] = {
    "sarscov2-ct": RemoteSet(
        "sarscov2-ct", None, kaggle="plameneduardo/sarscov2-ctscan-dataset",
        citation="Soares et al. 2020, doi:10.1101/2020.04.24.20078584 (CC BY-NC-SA 4.0)",
    ),
    "ucsd-covid-ct": RemoteSet(
        "ucsd-covid-ct", "https://github.com/UCSD-AI4H/COVID-CT/archive/refs/heads/master.zip",
        citation="Yang et al. 2020, arXiv:2003.13865 (research use; copyrights with the source papers)",
    ),
    "ieee8023": RemoteSet(
        "ieee8023", "https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip",
        citation="Cohen et al. 2020, arXiv:2006.11988 (per-image licenses in metadata.csv)",
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip, refusing members that would land outside `target`."""
    target = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            destination = (target / member).resolve()
            if not destination.is_relative_to(target):
                raise CovidscanError(f"{archive}: refusing to extract {member!r} outside {target}")
        zf.extractall(target)


def _fetch_url(url: str, destination: Path) -> None:
    partial = destination.with_suffix(destination.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:  # noqa: S310 (URLs are ours or the user's)
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CovidscanError(f"cannot download {url} ({exc}); covidscan needs network access for `data download` only") from None
    partial.replace(destination)


def _fetch_kaggle(slug: str, folder: Path) -> Path:
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi  # type: ignore[import-not-found]
    except ImportError:
        raise CovidscanError(
            f"{slug} is on Kaggle: pip install kaggle and put your API token in ~/.kaggle/kaggle.json, "
            "or download it by hand and use `covidscan data index FOLDER`"
        ) from None
    api = KaggleApi()
    try:
        api.authenticate()
        api.dataset_download_files(slug, path=str(folder), unzip=False, quiet=False)
    except Exception as exc:
        raise CovidscanError(f"Kaggle download of {slug} failed ({exc})") from None
    archives = sorted(folder.glob("*.zip"))
    if not archives:
        raise CovidscanError(f"Kaggle download of {slug} produced no zip file in {folder}")
    return archives[0]


def _check(name: str, archive: Path, pinned: str | None, dest: Path) -> str:
    actual = sha256_of(archive)
    record_path = dest / "CHECKSUMS.json"
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
    expected = pinned or recorded.get(name)
    if expected and expected != actual:
        raise CovidscanError(f"{archive}: SHA-256 {actual} does not match the expected {expected}; not extracting")
    recorded[name] = actual
    atomic.write_json(record_path, recorded)
    return actual


def download(name: str, dest: str | Path, url: str | None = None) -> Path:
    """Download and extract a public set into `dest/name`; return that folder."""
    if name not in REMOTE_SETS and url is None:
        raise CovidscanError(f"unknown data set {name!r}; known: {sorted(REMOTE_SETS)}")
    spec = REMOTE_SETS.get(name, RemoteSet(name, url))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source_url = url or spec.url
    if source_url:
        archive = dest / f"{name}.zip"
        _fetch_url(source_url, archive)
    elif spec.kaggle:
        archive = _fetch_kaggle(spec.kaggle, dest)
    else:
        raise CovidscanError(f"no download source for {name}")
    _check(name, archive, spec.sha256, dest)
    target = dest / name
    safe_extract(archive, target)
    return target
