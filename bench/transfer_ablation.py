"""P1 ablations (issue 14): sarscov2-ct -> all of ucsd-covid-ct, one change at a time to the recipe.

Usage: .venv/bin/python bench/transfer_ablation.py [--train] [--out runs/ablation] [--set train.threads=2]
Every row is `covidscan train runs/sarscov2-cluster-cl2/manifest.csv --config configs/sarscov2-cluster.yaml
--external runs/real/ucsd-covid-ct.csv --quick --set <change>` on the same cluster split (the manifest's split
column); the baseline row is runs/zoo/efficientnet_lite0 (the recipe unchanged). Nothing is chosen on UCSD:
every model, epoch and threshold comes from the sarscov2-ct validation part.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

VARIANTS = {
    "lung crop": ["data.preprocess=lung_crop"],
    "CLAHE": ["data.preprocess=clahe"],
    "lung crop + CLAHE": ["data.preprocess=lung_crop+clahe"],
    "histogram equalisation": ["data.preprocess=histeq"],
    "lung z-score": ["data.preprocess=lung_zscore"],
}
COVIDSCAN = str(Path(sys.executable).with_name("covidscan"))


def _ci(result: dict, name: str) -> str:
    value, band = result["metrics"][name], (result.get("ci") or {}).get(name)
    return f"{value:.3f} [{band['low']:.3f}–{band['high']:.3f}]" if band else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--baseline", type=Path, default=Path("runs/zoo/efficientnet_lite0"))
    parser.add_argument("--manifest", type=Path, default=Path("runs/sarscov2-cluster-cl2/manifest.csv"))
    parser.add_argument("--external", type=Path, default=Path("runs/real/ucsd-covid-ct.csv"))
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    runs = {"recipe (none)": args.baseline}
    for name, changes in VARIANTS.items():
        run = args.out / name.replace(" + ", "+").replace(" ", "_")
        runs[name] = run
        if args.train and not (run / "metrics.json").is_file():
            command = [COVIDSCAN, "train", str(args.manifest), "--config", "configs/sarscov2-cluster.yaml", "--external", str(args.external),
                       "-o", str(run), "--quick", "--quiet"]
            for item in changes + args.extra:
                command += ["--set", item]
            print(f"=== {name}", flush=True)
            subprocess.run(command)
    rows = []
    for name, run in runs.items():
        if not (run / "metrics.json").is_file():
            continue
        sets = json.loads((run / "metrics.json").read_text())["evaluation"]["sets"]
        test, ucsd = sets["in-domain test"], sets["ucsd-covid-ct"]
        patient = ucsd.get("patient_level") or {}
        rows.append({
            "change": name, "sarscov2-ct test AUC (P1 model selection side)": _ci(test, "auc"),
            "ucsd-covid-ct slice AUC (P1)": _ci(ucsd, "auc"),
            "ucsd-covid-ct patient AUC": _ci(patient, "auc") if "metrics" in patient else "n/a",
            "ucsd sensitivity / specificity": f"{ucsd['metrics']['sensitivity']:.3f} / {ucsd['metrics']['specificity']:.3f}",
            "ucsd refused": f"{ucsd['gate']['refused']} / {ucsd['gate']['refused'] + ucsd['n']}",
        })
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
