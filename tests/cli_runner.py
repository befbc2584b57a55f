"""The covidscan CLI run inside the test process: what a subprocess would print and exit with, without a second
Python and torch import (about 3 s each on 2 cores). An exception escaping `main()` (a traceback in a subprocess)
fails the test here. Tests that need a process boundary (SIGKILL, DDP, the page's server) keep subprocesses."""
from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass


@dataclass(frozen=True)
class CliResult:
    """Shaped like subprocess.CompletedProcess: returncode, stdout, stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    from covidscan.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["covidscan", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())
