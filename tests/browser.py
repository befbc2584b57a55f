"""Debian's Chromium for browser tests: found on PATH, or installed with apt when running as root (CI)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage"]


def chromium() -> str:
    """Path of the chromium binary; installs Debian's package when missing and allowed."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True)
        found = shutil.which("chromium")
        if found:
            return found
    pytest.fail("Debian's chromium is needed for the browser tests: apt-get install chromium (.ci/run does this)")


def dump_dom(url: str, profile: Path, budget_ms: int = 5000) -> str:
    """The DOM after the page's scripts ran, as Chromium serialises it."""
    out = subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
