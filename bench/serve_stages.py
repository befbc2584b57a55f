"""Where a served prediction's milliseconds go, for an exported bundle at the resolution it was trained at.

Usage: .venv/bin/python bench/serve_stages.py BUNDLE IMAGE [--repeats 300]

Per stage of one single-image request in the torch-free predictor (no HTTP):
decode (upload bytes -> gray float image, as the service reads it), resize
to the bundle's size, ONNX Runtime, gate distance, heat map; then the whole
predictor with and without heat map. Then ONNX Runtime alone for each graph
optimisation level and intra-op thread count. p50/p99 in ms over --repeats
calls after 20 warm-up calls. HTTP latency: bench/serve_latency.py --bundle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402
from serve_latency import percentiles, time_calls  # noqa: E402


def main() -> None:
    import onnxruntime as ort

    from covidscan.data.io import iter_image_bytes
    from covidscan.serve.predictor import Bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    bundle = Bundle(args.bundle)
    data = args.image.read_bytes()
    pixels = next(iter_image_bytes(data, args.image.name)).pixels
    prepared = bundle.prepare(pixels)
    batch = prepared[None, None].astype(np.float32) / 255.0
    _, features, gate_features = bundle.run(batch)
    positive = len(bundle.classes) - 1
    stages = {
        f"decode ({args.image.suffix.lstrip('.')}, {len(data) // 1024} kB, {pixels.shape[1]}x{pixels.shape[0]})": lambda: next(iter_image_bytes(data, "x")).pixels,
        f"resize to {bundle.size} px": lambda: bundle.prepare(pixels),
        "ONNX Runtime (logits, feature map, gate statistics)": lambda: bundle.session.run(None, {"images": batch}),
        "gate distance": lambda: bundle.gate(gate_features),
        "heat map (CAM from the feature map)": lambda: bundle.cam(features, positive),
        "predictor without heat map (resize + ORT + gate + label)": lambda: bundle.analyse([pixels], heatmaps=False),
        "predictor with heat map": lambda: bundle.analyse([pixels], heatmaps=True),
        "decode + predictor without heat map": lambda: bundle.analyse([next(iter_image_bytes(data, "x")).pixels], heatmaps=False),
    }
    rows = []
    for name, call in stages.items():
        p50, p99 = percentiles(time_calls(call, args.repeats))
        rows.append({"stage": name, "p50 ms": f"{p50:.3f}", "p99 ms": f"{p99:.3f}"})
    print(f"### Stages: {bundle.card.get('backbone')} at {bundle.size} px, bundle {args.bundle}, onnxruntime {ort.__version__}\n")
    print(markdown_table(rows))
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all (default)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    settings = []
    for threads in (1, 2):
        for label, level in levels.items():
            options = ort.SessionOptions()
            options.graph_optimization_level, options.intra_op_num_threads = level, threads
            session = ort.InferenceSession(str(args.bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
            p50, p99 = percentiles(time_calls(lambda: session.run(None, {"images": batch}), args.repeats))
            settings.append({"intra-op threads": threads, "graph optimisation": label, "p50 ms": f"{p50:.3f}", "p99 ms": f"{p99:.3f}"})
    print("\n### ONNX Runtime alone, batch 1\n")
    print(markdown_table(settings))


if __name__ == "__main__":
    main()
