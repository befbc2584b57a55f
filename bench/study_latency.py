"""Latency of a whole CT study through the service: 300 extension-less JPEG-Lossless 512 x 512 slices, study=true.

    .venv/bin/python bench/study_latency.py [--bundle runs/sarscov2-cluster-cl2/bundle] [--slices 300] [--repeats 3]

Starts `covidscan serve BUNDLE` (uvicorn, defaults: 400 MB body, concurrency 2) on loopback, uploads the series as
one multipart request (what the page sends), and reports, per repeat, the end-to-end time (upload + planning +
decoding + inference with a heat map per slice + the JSON answer), the service's own timing, the time to fetch
every slice image and heat map of the viewer, and the server process's peak memory (VmHWM). The series is
synthetic (a chest-like HU volume, 12-bit, compressed with libjpeg-turbo's lossless mode via imagecodecs) and its
file names are shuffled. Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402


def synthetic_series(count: int, size: int = 512) -> list[tuple[str, bytes]]:
    """(shuffled extension-less name, JPEG Lossless DICOM bytes) of a chest-like HU volume, head first."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import CTImageStorage, JPEGLosslessSV1, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    study, series = generate_uid(), generate_uid()
    names = rng.permutation(count)
    out = []
    for k in range(count):
        hu = np.full((size, size), -1000.0)
        hu[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1] = 40.0
        radius = 0.08 + 0.1 * np.sin(np.pi * k / count)
        for centre in (0.3, 0.7):
            hu[((xx - centre) / radius) ** 2 + ((yy - 0.5) / (1.6 * radius)) ** 2 < 1] = -850.0
        stored = np.clip(hu + rng.normal(0, 15, hu.shape) + 1024, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = CTImageStorage, generate_uid(), JPEGLosslessSV1
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = study, series, "CT", k + 1
        ds.PatientID, ds.PatientName = "BENCH", "Bench^Phantom"
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1.0, 0, 0, 0, 1.0, 0], [0.0, 0.0, -1.0 * k]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=12)])
        ds["PixelData"].VR = "OB"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append((f"IM{names[k] + 1:06d}", buffer.getvalue()))
    return sorted(out)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/sarscov2-cluster-cl2/bundle")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import httpx

    series = synthetic_series(args.slices)
    body_mb = sum(len(d) for _, d in series) / 1e6
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    covidscan = str(Path(sys.executable).with_name("covidscan"))
    server = subprocess.Popen([covidscan, "serve", args.bundle, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        for _ in range(600):
            try:
                if client.get("/api/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        rows = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            response = client.post("/api/v1/predict?study=true", files=[("files", (n, d, "application/dicom")) for n, d in series])
            total = time.perf_counter() - started
            response.raise_for_status()
            body = response.json()
            viewer = body["viewer"]
            started = time.perf_counter()
            for n in range(1, viewer["slices"] + 1):
                client.get(viewer["slice_url"].format(n=n), params={"window": "lung"}).raise_for_status()
                client.get(viewer["heatmap_url"].format(n=n)).raise_for_status()
            browse = time.perf_counter() - started
            rows.append({"repeat": repeat + 1, "slices": viewer["slices"], "body MB": f"{body_mb:.0f}", "end to end s": f"{total:.1f}",
                         "service s": f"{body['timing_ms']['total'] / 1000:.1f}", "all viewer images s": f"{browse:.1f}",
                         "per slice image + heat map ms": f"{1000 * browse / viewer['slices']:.1f}",
                         "server peak MB": f"{peak_rss_mb(server.pid):.0f}", "study": body["study"]["label"]})
        print(f"bundle {args.bundle}, {args.slices} slices of 512 x 512 JPEG Lossless, {os.cpu_count()} CPU cores; "
              f"median end to end {statistics.median(float(r['end to end s']) for r in rows):.1f} s")
        print(markdown_table(rows))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
