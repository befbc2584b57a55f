"""Audit the real data sets in ../shared/data and report findings and timings.

Usage: .venv/bin/python bench/audit_real_data.py [--data ../shared/data] [--out runs/bench-audit]

Also rebuilds sarscov2-ct with the release's original RGB/RGBA file modes
(from its MANIFEST.csv) in a temporary folder, since real users feed the
release as downloaded. Nothing is written into the repository but runs/.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

from covidscan.data.audit import run_audit
from covidscan.data.audit_report import write_audit
from covidscan.data.public_sets import index_sources


def rewrite_with_original_modes(root: Path, target: Path) -> Path:
    table = pd.read_csv(root / "MANIFEST.csv")
    for record in table.to_dict("records"):
        source = root / record["class"] / record["file"]
        out = target / record["class"] / record["file"]
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert(record["original_mode"]).save(out)
    return target


def audit(name: str, roots: list[Path], out: Path) -> dict[str, object]:
    started = time.perf_counter()
    frame = index_sources(roots)
    result = run_audit(frame, show=False)
    write_audit(result, out / name, name)
    s = result.summary
    shortcuts = [f"{r['property']} (AUC {r['auc']:.2f})" for r in s["shortcut_risks"] if r["warning"]]  # type: ignore[union-attr]
    dups = [" = ".join(Path(p).name for p in d["paths"]) for d in s["exact_duplicates"]]  # type: ignore[union-attr]
    return {
        "set": name, "images": s["images"], "seconds": round(time.perf_counter() - started, 1),
        "exact duplicate groups": "; ".join(dups) or "none",
        "near-dup pairs (within/across class)": f"{s['near_duplicates']['within_class']}/{s['near_duplicates']['across_classes']}",  # type: ignore[index]
        "shortcut warnings": ", ".join(shortcuts) or "none",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-audit"))
    args = parser.parse_args()
    data = args.data.resolve()
    if not (data / "sarscov2-ct").is_dir():
        print(f"real data not found under {data}; nothing to benchmark", file=sys.stderr)
        return 1
    rows = [audit("sarscov2-ct", [data / "sarscov2-ct"], args.out)]
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = rewrite_with_original_modes(data / "sarscov2-ct", Path(tmp) / "sarscov2-ct-original-modes")
        rows.append(audit("sarscov2-ct (original RGB/RGBA modes)", [rewritten], args.out))
    rows.append(audit("ucsd-covid-ct", [data / "ucsd-covid-ct"], args.out))
    rows.append(audit("ieee8023 + kermany-normal", [data / "covid-cxr" / "ieee8023", data / "covid-cxr" / "kermany-normal"], args.out))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
