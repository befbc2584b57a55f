"""Self-supervised pretraining against a change of hospital (issue 14): SimCLR on unlabelled slices, then P1 and P2.

The unlabelled pool is what a hospital adopting covidscan would have without labelling anything: the training part
of P1's sarscov2-ct split and the UCSD official *training* part (as AdaBN used it), labels dropped. Neither
P1's sarscov2-ct test part nor the UCSD official validation part is in it, so the figures on those two stay clean;
P1's "ucsd-covid-ct, all" includes the UCSD training part seen here unlabelled (read the official validation row).

Usage: .venv/bin/python bench/pretrain_real_data.py [--epochs 10] [--size 128] [--name ssl] [--set k=v ...]
Needs bench/quality.py's manifests and its `recommended` P1 run (for the split). Writes runs/ssl/ and runs/quality/NAME/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from quality import COVIDSCAN, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--name", default="ssl")
    parser.add_argument("--split-run", type=Path, default=Path("runs/quality/recommended/P1"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    folder = Path("runs/ssl")
    folder.mkdir(parents=True, exist_ok=True)
    split = pd.read_csv(args.split_run / "manifest.csv", keep_default_na=False)
    ucsd_train = pd.read_csv("runs/quality/manifests/ucsd-train.csv", keep_default_na=False)
    pool = pd.concat([split[split["split"] == "train"], ucsd_train])[["path", "slice_index"]].copy()
    pool["label"] = "unlabelled"  # nothing of the labels reaches pretraining
    manifest = folder / "unlabelled.csv"
    pool.to_csv(manifest, index=False)
    weights = folder / f"{args.name}-{args.size}px.safetensors"
    if not weights.is_file():
        run([COVIDSCAN, "pretrain", str(manifest), "-o", str(weights), "--size", str(args.size), "--epochs", str(args.epochs), "--quiet"],
            folder / f"{weights.stem}.log")
    sets = [f"model.weights={weights}", f"data.image_size={args.size}", *args.sets]
    run([sys.executable, str(ROOT / "bench" / "quality.py"), "--config", "configs/recommended.yaml", "--name", args.name,
         "--protocol", "P1", "--protocol", "P2", *[item for s in sets for item in ("--set", s)]], folder / f"{args.name}-quality.log")


if __name__ == "__main__":
    main()
