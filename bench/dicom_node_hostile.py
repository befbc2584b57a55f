"""The DICOM node against large instances and slow peers: memory and availability (issue 30).

    python bench/dicom_node_hostile.py runs/demo/bundle --out runs/node-after.json
    PYTHONPATH=/tmp/before/src python bench/dicom_node_hostile.py runs/demo/bundle --out runs/node-before.json

The node runs as `covidscan dicom-listen` in a child process (PYTHONPATH picks the version under test).
1. memory: 12 instances of 4000 x 4000 int16 (32 MB each) sent in one association, the study left pending
   (--idle-seconds 3600): the node's RSS before, its peak (VmHWM) and RSS after;
2. availability: 10 connections from 127.0.0.2 that send the first 8 bytes of an A-ASSOCIATE-RQ and stop, and 12
   idle TCP connections from 127.0.0.3, held open while 127.0.0.1 sends a C-ECHO every second for --probe-s
   seconds: how many probes were answered, and the slowest answer. Linux only (/proc, 127.0.0.x sources).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_service import _free_port, _status_kb  # noqa: E402


def _echo(port: int, timeout: float = 10.0) -> float | None:
    """Seconds to an answered C-ECHO, or None when the association or the echo failed."""
    from pynetdicom import AE

    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="COVIDSCAN")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return time.perf_counter() - started if status and int(status.Status) == 0 else None
    finally:
        assoc.release()


class Node:
    def __init__(self, bundle: str, spool: Path) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "covidscan.cli", "dicom-listen", bundle, "--send-to", "127.0.0.1:9:PACS", "--port", str(self.port),
                   "--host", "0.0.0.0", "--idle-seconds", "3600"]
        if not os.environ.get("PYTHONPATH"):  # the version under test has the spool option
            command += ["--spool", str(spool)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline and _echo(self.port, 2.0) is None:
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def memory_case(node: Node) -> dict[str, object]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE

    pid = node.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _status_kb(pid, "VmRSS")
    pixels = np.random.default_rng(0).integers(0, 2000, (4000, 4000)).astype(np.int16).tobytes()
    study = generate_uid()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COVIDSCAN")
    statuses = []
    for index in range(12):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = CTImageStorage, generate_uid(), study
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "BENCH-1", index + 1
        ds.Rows = ds.Columns = 4000
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status else -1)
    assoc.release()
    time.sleep(2.0)
    return {"case": "12 instances of 4000x4000 int16 (32 MB each), study pending", "statuses": sorted(set(statuses)),
            "rss_before_mb": round(before / 1024), "peak_growth_mb": round((_status_kb(pid, "VmHWM") - before) / 1024),
            "rss_after_mb": round(_status_kb(pid, "VmRSS") / 1024)}


def availability_case(node: Node, name: str, source: str, count: int, payload: bytes, probe_s: float) -> dict[str, object]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=5, source_address=(source, 0))
        if payload:
            sock.sendall(payload)
        held.append(sock)
    answered, slowest, probes = 0, 0.0, 0
    deadline = time.monotonic() + probe_s
    try:
        while time.monotonic() < deadline:
            probes += 1
            seconds = _echo(node.port)
            if seconds is not None:
                answered, slowest = answered + 1, max(slowest, seconds)
            time.sleep(1.0)
    finally:
        for sock in held:
            sock.close()
    return {"case": name, "probes": probes, "answered": answered, "slowest_s": round(slowest, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default="runs/demo/bundle")
    parser.add_argument("--probe-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as spool:
        for case in ("memory", "partial", "idle"):
            node = Node(args.bundle, Path(spool) / case)
            try:
                if case == "memory":
                    row = memory_case(node)
                elif case == "partial":
                    row = availability_case(node, "10 connections sending 8 bytes of an A-ASSOCIATE-RQ, then nothing", "127.0.0.2", 10,
                                            struct.pack(">BBIH", 1, 0, 300, 1), args.probe_s)
                else:
                    row = availability_case(node, "12 idle TCP connections", "127.0.0.3", 12, b"", args.probe_s)
            finally:
                node.stop()
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pythonpath": os.environ.get("PYTHONPATH", ""), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
