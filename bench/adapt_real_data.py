"""AdaBN or TENT to a new hospital: sarscov2-ct model -> UCSD, adapted on the UCSD *training* part's images (labels unused),
measured on the UCSD *validation* part (patient-disjoint from the training part, never used for adaptation).

Usage: .venv/bin/python bench/adapt_real_data.py SOURCE_RUN [--ucsd runs/real/ucsd-covid-ct.csv] [--work runs/adapt] [--method adabn|tent]
SOURCE_RUN: a run trained on sarscov2-ct (e.g. `covidscan train ... --config configs/sarscov2-cluster.yaml`).
Writes WORK/source (a copy of SOURCE_RUN evaluated on the UCSD validation part) and WORK/METHOD (the adapted run).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from covidscan.adapt import ADAPT_METHODS, adapt_run
from covidscan.data.manifest import load_manifest, save_manifest
from covidscan.evaluate.evaluation import evaluate_run, set_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--ucsd", type=Path, default=Path("runs/real/ucsd-covid-ct.csv"))
    parser.add_argument("--work", type=Path, default=Path("runs/adapt"))
    parser.add_argument("--method", choices=ADAPT_METHODS, default="adabn")
    args = parser.parse_args()
    ucsd = load_manifest(args.ucsd)
    if "official_split" not in ucsd.columns:
        raise SystemExit(f"{args.ucsd}: no official_split column; index ucsd-covid-ct with `covidscan data index --kind ucsd-covid-ct`")
    train, val = (ucsd[ucsd["official_split"] == part].reset_index(drop=True) for part in ("train", "val"))
    args.work.mkdir(parents=True, exist_ok=True)
    save_manifest(train, args.work / "ucsd-train.csv")
    source = args.work / "source"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(args.source, source, ignore=shutil.ignore_patterns("bundle", "heatmaps", "external", "predictions"))
    quiet = {"show": False, "log": lambda m: None}
    from covidscan.config import QUICK_EVALUATION, load_config

    cfg = load_config(source / "config.yaml", QUICK_EVALUATION).evaluate
    before = evaluate_run(source, {"ucsd-val": val}, cfg, **quiet)  # type: ignore[arg-type]
    adapted_dir = args.work / args.method
    if adapted_dir.exists():
        shutil.rmtree(adapted_dir)
    adapt_run(source, train, adapted_dir, "ucsd-train", show=False, log=print, method=args.method)
    after = evaluate_run(adapted_dir, None, cfg, **quiet)  # the copied external set: ucsd-val
    for label, metrics in (("source", before), (f"{args.method} on ucsd-train", after)):
        for name in ("in-domain test", "ucsd-val"):
            print(f"{label:22s} {set_summary(name, metrics['evaluation']['sets'][name])}")  # type: ignore[index]


if __name__ == "__main__":
    main()
