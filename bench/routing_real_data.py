"""Which model answers a plain image when a CT and a chest X-ray model are served together (issue 15).

    .venv/bin/python bench/routing_real_data.py [--ct runs/quality/recipe/P1] [--xray runs/xray/A-patient] [--per-set 100]

Serves the two exported bundles in one app (serve/router.py; in process, FastAPI's TestClient) and posts, one by
one as PNG files (no DICOM tag, so the input gates decide), held-out images of each run's test part and of
ucsd-covid-ct: counts which model answered and how many were refused. Exports a run's bundle first if it has none.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

COVIDSCAN = str(Path(sys.executable).with_name("covidscan"))


def bundle_of(run: Path) -> Path:
    if not (run / "bundle" / "model.json").is_file():
        subprocess.run([COVIDSCAN, "export", str(run)], check=True)
    return run / "bundle"


def test_images(run: Path, count: int, seed: int = 0) -> list[str]:
    frame = pd.read_csv(run / "manifest.csv", keep_default_na=False)
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    return list(np.random.default_rng(seed).choice(paths, min(count, len(paths)), replace=False))


def png_bytes(path: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    with Image.open(path) as image:
        image.convert("L").save(out, "PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=Path("runs/quality/recipe/P1"))
    parser.add_argument("--xray", type=Path, default=Path("runs/xray/A-patient"))
    parser.add_argument("--ucsd", type=Path, default=Path("runs/real/ucsd-covid-ct.csv"))
    parser.add_argument("--per-set", type=int, default=100)
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from covidscan.serve.app import create_app
    from covidscan.serve.router import bundle_name

    ct, xray = bundle_of(args.ct), bundle_of(args.xray)
    client = TestClient(create_app([ct, xray]))
    names = {bundle_name(ct): "CT model", bundle_name(xray): "X-ray model"}
    ucsd = pd.read_csv(args.ucsd, keep_default_na=False)["path"].tolist() if args.ucsd.is_file() else []
    sets = {
        f"CT slices: {args.ct} test part": test_images(args.ct, args.per_set),
        f"chest X-rays: {args.xray} test part": test_images(args.xray, args.per_set),
        "CT slices: ucsd-covid-ct (another hospital)": list(np.random.default_rng(0).choice(ucsd, min(args.per_set, len(ucsd)), replace=False)) if ucsd else [],
    }
    rows = []
    for name, paths in sets.items():
        answered: Counter[str] = Counter()
        for path in paths:
            response = client.post("/api/v1/predict?heatmap=false", files=[("files", ("image.png", png_bytes(path), "image/png"))])
            answered[names.get(response.json()["model"], "?") if response.status_code == 200 else f"refused ({response.status_code})"] += 1
        if paths:
            rows.append({"images (as PNG)": name, "n": len(paths), "CT model answered": answered["CT model"],
                         "X-ray model answered": answered["X-ray model"], "refused by both gates": sum(v for k, v in answered.items() if k.startswith("refused"))})
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
