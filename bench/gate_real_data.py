"""How often the service's input gate refuses real scans and photographs.

    .venv/bin/python bench/gate_real_data.py BUNDLE RUN [EXTERNAL_MANIFEST ...] [xray:CXR_MANIFEST ...]

BUNDLE: from `covidscan export RUN`. Counts refusals on the run's test split
(unseen patients/clusters of the training data set; should be ~never), on
external manifests (another hospital's CT; reported, not a target), on the
photographs that ship with scikit-image (should be ~always), and on chest
X-rays when a manifest of them is given (a different modality).
Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

from covidscan.data.io import read_image  # noqa: E402
from covidscan.data.manifest import image_refs, load_manifest  # noqa: E402
from covidscan.serve.predictor import Bundle  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "text", "moon", "page", "horse", "coins",
          "clock", "hubble_deep_field", "immunohistochemistry", "retina", "cat", "motorcycle_left", "brick", "grass", "gravel")


def refusal(bundle: Bundle, images: list[np.ndarray]) -> tuple[int, int, float]:
    results = bundle.analyse(images, heatmaps=False)
    distance = np.array([r.gate_distance for r in results])
    return int((~np.array([r.in_distribution for r in results])).sum()), len(results), float(np.median(distance))


def photographs() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(data, name)(), np.float32)
        except Exception:  # some need an optional download (pooch): skip them offline
            continue
        if image.ndim == 3:
            image = image[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
        out.append(image / (image.max() or 1.0))
    return out


def main() -> None:
    bundle_dir, run_dir, *rest = sys.argv[1:]
    externals = [m for m in rest if not m.startswith("xray:")]
    xray_manifests = [m.removeprefix("xray:") for m in rest if m.startswith("xray:")]
    bundle = Bundle(bundle_dir)
    frame = load_manifest(Path(run_dir) / "manifest.csv")
    rows = []
    test = frame[frame["split"] == "test"]
    sets = [("test split of the training set", test)] + [(Path(m).stem + " (external)", load_manifest(m)) for m in externals]
    for name, part in sets:
        images = [read_image(path, index).pixels for path, index in image_refs(part)]
        refused, total, median = refusal(bundle, images)
        rows.append([name, total, refused, f"{refused / total:.1%}", f"{median:.3f}"])
    photos = photographs()
    refused, total, median = refusal(bundle, photos)
    rows.append(["scikit-image photographs", total, refused, f"{refused / total:.1%}", f"{median:.3f}"])
    for manifest in xray_manifests:
        part = load_manifest(manifest)
        refused, total, median = refusal(bundle, [read_image(path, index).pixels for path, index in image_refs(part)])
        rows.append([Path(manifest).stem + " (chest X-ray: other modality)", total, refused, f"{refused / total:.1%}", f"{median:.3f}"])
    print(f"\n### Input gate: refuse above Mahalanobis distance {bundle.gate_threshold:.1f} (99.5th percentile of validation images)\n")
    print(markdown_table([dict(zip(["images", "n", "refused", "refusal rate", "median distance"], r)) for r in rows]))


if __name__ == "__main__":
    main()
