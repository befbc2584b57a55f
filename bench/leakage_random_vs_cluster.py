"""Random vs similarity-cluster split on sarscov2-ct: leakage figure and test metrics.

Usage: .venv/bin/python bench/leakage_random_vs_cluster.py [--data ../shared/data] [--finetune-epochs 10]

For each split (same seed, 20 % test, 20 % validation):
  * the leakage figure (test images with a near duplicate in train);
  * a linear probe: logistic regression on frozen ImageNet features, C chosen on validation;
  * (unless --finetune-epochs 0) efficientnet_lite0 fine-tuned by the real pipeline at 128 px.
The same model recipe runs on both splits; only the split differs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

from covidscan.config import load_config, packaged_config
from covidscan.data.public_sets import index_source
from covidscan.data.split import split_manifest
from covidscan.evaluate.metrics import binary_metrics
from covidscan.models.embed import manifest_embeddings
from covidscan.pipeline import train_run


def linear_probe(embeddings: np.ndarray, y: np.ndarray, split: np.ndarray) -> dict[str, float]:
    train, val, test = (split == "train"), (split == "val"), (split == "test")
    best = max(
        (LogisticRegression(C=c, max_iter=2000).fit(embeddings[train], y[train]) for c in (0.01, 0.1, 1.0, 10.0)),
        key=lambda m: float(m.score(embeddings[val], y[val])),
    )
    return binary_metrics(y[test], best.predict_proba(embeddings[test])[:, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-leakage"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    args = parser.parse_args()
    root = args.data.resolve() / "sarscov2-ct"
    if not root.is_dir():
        print(f"real data not found at {root}; nothing to benchmark", file=sys.stderr)
        return 1
    frame = index_source(root)
    embeddings = manifest_embeddings(frame, Path("runs/cache/sarscov2-embeddings.npz"))
    y = (frame["label"] == "COVID").to_numpy().astype(int)
    rows = []
    for by in ("random", "cluster"):
        split_frame, report = split_manifest(frame, by, embeddings, 0.2, 0.2, args.seed)
        leak = report["leakage_test"]
        probe = linear_probe(embeddings, y, split_frame["split"].to_numpy())
        row: dict[str, object] = {
            "split": by, "groups": report["groups"], "test images": leak["test_images"],  # type: ignore[index]
            "leakage (near-dup share)": f"{leak['share']:.1%}", "median NN sim": leak["median_nn_similarity"],  # type: ignore[index]
            "probe acc": f"{probe['accuracy']:.3f}", "probe AUC": f"{probe['auc']:.3f}", "probe F1": f"{probe['f1']:.3f}",
        }
        if args.finetune_epochs:
            config = load_config(packaged_config("demo"), [f"train.epochs={args.finetune_epochs}", "train.patience=3"])
            started = time.perf_counter()
            metrics = train_run(split_frame, config, args.out / by, show_progress=False,
                                log=lambda m: print(f"[{by}] {m}", flush=True), split_report=report)
            test = metrics["test"]
            row.update({"fine-tune acc": f"{test['accuracy']:.3f}", "fine-tune AUC": f"{test['auc']:.3f}",  # type: ignore[index]
                        "fine-tune F1": f"{test['f1']:.3f}", "fine-tune s": round(time.perf_counter() - started)})  # type: ignore[index]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
