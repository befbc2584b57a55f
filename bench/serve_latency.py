"""Service speed on this machine: predictor latency (ONNX Runtime vs PyTorch eager) and HTTP under load.

    .venv/bin/python bench/serve_latency.py [--requests 300] [--duration 10]

1. Single-image latency, EfficientNet-Lite0 at 224 px (ImageNet weights, 2-class head), batch 1,
   on the CPU threads this machine has: PyTorch eager vs the exported ONNX graph, and the whole
   torch-free predictor (resize + ONNX + gate + optional heat map).
2. End-to-end `POST /api/v1/predict` through uvicorn on loopback, loaded by wrk (Debian package)
   at concurrency 1, 4 and 16 for a fixed time each, with and without heat maps; latency
   percentiles, requests/s, non-2xx/socket errors, and the server process's peak memory.
The synthetic test image is a phantom slice; real-data speed is the same (the model sees 224 px).
Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset  # noqa: E402
from covidscan.data.transforms import Normaliser  # noqa: E402
from covidscan.export.onnx import export_model  # noqa: E402
from covidscan.models.classifier import CovidClassifier  # noqa: E402
from covidscan.models.registry import get_backbone  # noqa: E402

SIZE = 224


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


def time_calls(function, repeats: int, warmup: int = 20) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        function()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        out.append((time.perf_counter() - started) * 1000)
    return out


def make_bundle(folder: Path, images: np.ndarray) -> tuple[CovidClassifier, Path]:
    model = CovidClassifier("efficientnet_lite0", 2, weights="packaged").eval()
    normaliser = Normaliser.for_backbone(get_backbone("efficientnet_lite0"))
    card = {"backbone": "efficientnet_lite0", "classes": ["non-COVID", "COVID"], "positive_class": "COVID", "threshold": 0.5,
            "calibration": {"temperature": 1.0, "operating_points": {"default": 0.5}}, "covidscan_version": "bench"}
    bundle = folder / "bundle"
    export_model(model, normaliser.mean, normaliser.std, SIZE, card, bundle, images[:4], images, images)
    return model, bundle


def wrk_run(url: str, body_file: Path, boundary: str, concurrency: int, seconds: int) -> dict[str, float]:
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*all"); f:close()\n'
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("P50 %f\\nP99 %f\\nREQS %d\\nNON2XX %d\\nSOCKERR %d\\n", latency:percentile(50), latency:percentile(99),'
        " summary.requests, summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))\n"
        "end\n"
    )
    out = subprocess.run(["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    values = {k: float(v) for k, v in re.findall(r"^(P50|P99|REQS|NON2XX|SOCKERR) ([\d.]+)$", out, re.M)}
    return {"p50": values["P50"] / 1000, "p99": values["P99"] / 1000, "rps": values["REQS"] / seconds,
            "errors": values["NON2XX"] + values["SOCKERR"], "requests": values["REQS"]}


def http_table(bundle_dir: Path, upload: bytes, filename: str, duration: int, work: Path) -> list[dict[str, object]]:
    """POST /api/v1/predict through a real server under wrk at concurrency 1, 4, 16, with and without heat maps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "covidscan.serve", str(bundle_dir), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        boundary = "covidscanbench"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + upload + f"\r\n--{boundary}--\r\n".encode()
        body_file = work / "body.bin"
        body_file.write_bytes(body)
        rows: list[dict[str, object]] = []
        for heatmap in (False, True):
            for concurrency in (1, 4, 16):
                url = f"http://127.0.0.1:{port}/api/v1/predict?heatmap={'true' if heatmap else 'false'}"
                r = wrk_run(url, body_file, boundary, concurrency, duration)
                rows.append({"heat map": "yes" if heatmap else "no", "concurrency": concurrency, "p50 ms": f"{r['p50']:.1f}",
                             "p99 ms": f"{r['p99']:.1f}", "requests/s": f"{r['rps']:.1f}", "requests": int(r["requests"]), "errors": int(r["errors"])})
        status = Path(f"/proc/{server.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        print(f"Server process memory after the load: RSS {rss:.0f} MB, peak {peak:.0f} MB (torch not imported).")
    finally:
        server.terminate()
        server.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per concurrency level")
    parser.add_argument("--bundle", type=Path, help="serve this exported bundle (HTTP rows only) instead of a 224 px synthetic one")
    parser.add_argument("--image", type=Path, help="with --bundle: the image each request uploads")
    args = parser.parse_args()
    if args.bundle is not None:
        if args.image is None:
            parser.error("--bundle needs --image")
        print(markdown_table(http_table(args.bundle, args.image.read_bytes(), args.image.name, args.duration, Path(tempfile.mkdtemp()))))
        return
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="covidscan-bench-"))
    try:
        data = generate_phantom_dataset(work / "data", PhantomSpec(patients_per_class=4, slices_per_patient=4, image_size=SIZE, seed=3))
        files = sorted(data.rglob("*.png"))
        from covidscan.data.io import load_resized

        images = np.stack([load_resized(f, SIZE)[None] for f in files]).astype(np.float32) / 255.0
        model, bundle_dir = make_bundle(work, images)

        import onnxruntime as ort

        from covidscan.serve.predictor import Bundle

        # ONNX Runtime first: PyTorch's OpenMP threads keep spinning after its calls and would slow ORT down.
        session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        onnx_ms = time_calls(lambda: session.run(None, {"images": images[:1]}), args.repeats)
        bundle = Bundle(bundle_dir)
        gray = images[0, 0]
        predictor_ms = time_calls(lambda: bundle.analyse([gray], heatmaps=False), args.repeats)
        predictor_cam_ms = time_calls(lambda: bundle.analyse([gray], heatmaps=True), args.repeats)
        x = torch.from_numpy(images[:1])
        normaliser = Normaliser.for_backbone(get_backbone("efficientnet_lite0"))
        with torch.inference_mode():
            eager = time_calls(lambda: model(normaliser(x)), args.repeats)
        rows = [
            ["PyTorch eager (model only)", *percentiles(eager)],
            ["ONNX Runtime (model only)", *percentiles(onnx_ms)],
            ["covidscan predictor, ONNX (resize + model + gate)", *percentiles(predictor_ms)],
            ["covidscan predictor, ONNX, with heat map", *percentiles(predictor_cam_ms)],
        ]
        print(f"\n### Predictor latency: efficientnet_lite0, {SIZE} px, batch 1, {threads} CPU threads, torch {torch.__version__}, onnxruntime {ort.__version__}\n")
        print(markdown_table([{"path": r[0], "p50 ms": f"{r[1]:.2f}", "p99 ms": f"{r[2]:.2f}"} for r in rows]))

        png = files[0].read_bytes()
        http_rows = http_table(bundle_dir, png, "slice.png", args.duration, work)
        print(f"\n### HTTP POST /api/v1/predict: uvicorn (1 worker) on loopback, wrk 1 thread, {args.duration} s per row, one {len(png) // 1024} kB PNG per request; load generator on the same {threads} cores\n")
        print(markdown_table(http_rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
