"""Zip and study uploads against a live service: status, time, peak memory growth per request, RSS after (issue 30).

    python bench/zip_study_memory.py runs/demo/bundle --out runs/zip-after.json
    PYTHONPATH=/tmp/before/src python bench/zip_study_memory.py runs/demo/bundle --out runs/zip-before.json
    python bench/zip_study_memory.py --table runs/zip-before.json runs/zip-after.json

The service runs as `python -m covidscan.serve` in a child process (bench/hostile_service.py's Server), a fresh one
per case; "peak growth" is VmHWM after the request minus VmRSS before it. The parallel case sends three requests at once and reports
the growth of all three together; the repeated case sends the same request five times and reports RSS before the
first and after the last. Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_helpers import chest_volume, write_ct_series  # noqa: E402
from hostile_corpus import Case, encoded_request  # noqa: E402
from hostile_service import Server, _status_kb  # noqa: E402

ZIP = "application/zip"


def _zip(members: dict[str, bytes] | list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in (members.items() if isinstance(members, dict) else members):
            archive.writestr(name, data)
    return buffer.getvalue()


def _zeros_zip(member_bytes: int, count: int) -> bytes:
    """`count` members of `member_bytes` zeros, compressed once and stored `count` times."""
    buffer = io.BytesIO()
    zeros = b"\0" * member_bytes
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for index in range(count):
            archive.writestr(f"zeros-{index:04d}", zeros)
    return buffer.getvalue()


def _multi_frame_ct(frames: int, side: int, folder: Path) -> bytes:
    from pydicom import dcmread

    volume = chest_volume(side, frames)
    first = write_ct_series(folder, volume[:1])[0]
    ds = dcmread(first)
    ds.NumberOfFrames, ds.PixelData = frames, np.ascontiguousarray(volume).astype(np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _tiny_slices(count: int, folder: Path) -> bytes:
    paths = write_ct_series(folder, chest_volume(64, count))
    return _zip([(f"S/{p.name}", p.read_bytes()) for p in paths])


def _post(server: Server, case: Case, timeout: float) -> tuple[int, float]:
    path, headers, body = encoded_request(case)
    started = time.perf_counter()
    try:
        status, _ = server.post(path, headers, body, timeout)
    except OSError:
        status = -1
    return status, time.perf_counter() - started


def measure(server: Server, name: str, case: Case, parallel: int = 1, repeat: int = 1, timeout: float = 300.0) -> dict[str, object]:
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _status_kb(pid, "VmRSS")
    statuses: list[int] = []
    seconds: list[float] = []
    for _ in range(repeat):
        threads = []
        for _ in range(parallel):
            thread = threading.Thread(target=lambda: (lambda r: (statuses.append(r[0]), seconds.append(r[1])))(_post(server, case, timeout)))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    time.sleep(1.0)
    alive = server.process.poll() is None
    row = {"case": name, "statuses": sorted(statuses), "seconds_max": round(max(seconds), 1),
           "request_mb": round(len(encoded_request(case)[2]) / 1e6, 1),
           "rss_before_mb": round(before / 1024), "peak_growth_mb": round((_status_kb(pid, "VmHWM") - before) / 1024) if alive else None,
           "rss_after_mb": round(_status_kb(pid, "VmRSS") / 1024) if alive else None}
    if not alive:
        server.restart()
    return row


def rows(bundle: str, work: Path, scale: float) -> list[dict[str, object]]:
    mb = int(1e6 * scale)
    ct = _multi_frame_ct(max(int(300 * scale), 4), 512, work / "ct")
    cases = [
        ("0.5 MB zip inflating to 500 MB of zeros", Case("z500", [("a.zip", _zeros_zip(500 * mb, 1), ZIP)], ()), 1, 1),
        ("zip inflating to 1.9 GB (8 members of 240 MB)", Case("z19", [("b.zip", _zeros_zip(240 * mb, 8), ZIP)], ()), 1, 1),
        ("zip of 2,048 members of 0.95 MB zeros", Case("z2048", [("c.zip", _zeros_zip(int(0.95 * mb), 2048), ZIP)], ()), 1, 1),
        ("3 x the 500 MB zip in parallel", Case("z500p", [("a.zip", _zeros_zip(500 * mb, 1), ZIP)], ()), 3, 1),
        ("zip of one 300-frame 512x512 CT", Case("zct", [("ct.zip", _zip({"ct.dcm": ct}), ZIP)], ()), 1, 1),
        ("the same CT as a plain upload", Case("ct", [("ct.dcm", ct, "application/dicom")], ()), 1, 1),
        ("zip of 1,000 tiny slices, sent 5 times", Case("tiny", [("t.zip", _tiny_slices(1000, work / "tiny"), ZIP)], ()), 1, 5),
    ]
    out = []
    for name, case, parallel, repeat in cases:
        server = Server(bundle)  # a fresh service per case: memory freed by an earlier case cannot hide this one's growth
        try:
            row = measure(server, name, case, parallel, repeat)
        finally:
            server.stop()
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def table(before: Path, after: Path) -> str:
    old = {r["case"]: r for r in json.loads(before.read_text())["rows"]}
    new = json.loads(after.read_text())["rows"]
    lines = ["| request | before: answer, s, peak growth, RSS after | after: answer, s, peak growth, RSS after |", "|---|---|---|"]

    def cell(row: dict[str, object] | None) -> str:
        if row is None:
            return "not run"
        statuses = row["statuses"]
        answer = " / ".join(str(s) for s in sorted(set(statuses))) + (f" (x{len(statuses)})" if len(statuses) > 1 else "")  # type: ignore[arg-type]
        return f"{answer}, {row['seconds_max']} s, +{row['peak_growth_mb']} MB, {row['rss_before_mb']} -> {row['rss_after_mb']} MB"

    for row in new:
        lines.append(f"| {row['case']} | {cell(old.get(row['case']))} | {cell(row)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default="runs/demo/bundle")
    parser.add_argument("--scale", type=float, default=1.0, help="sizes x this (0.05 for a quick check)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/covidscan-zip-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.table:
        print(table(*args.table))
        return
    measured = rows(args.bundle, args.work, args.scale)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pythonpath": os.environ.get("PYTHONPATH", ""), "scale": args.scale, "rows": measured}, indent=1))


if __name__ == "__main__":
    main()
