"""The quality benchmark of issue 14: does a recipe hold up in another hospital? Five protocols, one command.

Usage:
  .venv/bin/python bench/quality.py --config configs/recommended.yaml --name recommended [--protocol P1 ...] [--set k=v ...]
  .venv/bin/python bench/quality.py --table            # the protocol and ablation tables of every name run so far
  .venv/bin/python bench/quality.py --seeds            # P1 and P2 over seeds: every NAME-seedN run, grouped by NAME

Reads ../shared/data (sarscov2-ct and ucsd-covid-ct, indexed with `covidscan data index`); writes OUT/NAME/P1..P5.
Every protocol is a plain covidscan command (printed before it runs), with the quick evaluation (every metric with
its 95 % CI, patients or split groups as clusters; no heat maps):
  P1 zero-shot external: `train` on sarscov2-ct (cluster split: the model, epoch and thresholds come from its
     validation part) -> all of ucsd-covid-ct, and its official validation part.
  P2 UCSD in-domain: `train` on the UCSD official training part, split by patient into train / validation (80/20,
     stratified by the patient's class, seed 0) -> the official validation part as the test part, never used to select.
  P3 sarscov2-ct in-domain: `cv`, 5 similarity-cluster folds, with each fold's leakage figure; the AUC is pooled over
     the out-of-fold predictions (CI with the clusters as groups).
  P4 multi-source: `train` on sarscov2-ct (P1's training and validation parts) + the UCSD training part (P2's), with
     source-balanced sampling -> the UCSD official validation part and P1's held-out sarscov2-ct groups.
  P5 local adaptation: `finetune` of P1's model with k = 5, 10, 20, 40 labelled patients of the UCSD training part
     (3 draws each) -> the UCSD official validation part; k = 0 is P1's model itself.
Nothing is selected on a set reported as external or test. The UCSD official test part is not in ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

COVIDSCAN = str(Path(sys.executable).with_name("covidscan"))
PROTOCOLS = ("P1", "P2", "P3", "P4", "P5")
P5_PATIENTS = (5, 10, 20, 40)
P5_DRAWS = (0, 1, 2)
QUICK = ["evaluate.gallery_per_cell=0", "evaluate.plausibility_images=0", "evaluate.tsne_points=0", "evaluate.bootstrap=200"]


def run(command: list[str], log: Path) -> float:
    """Run one covidscan command (its output appended to `log`); return its wall time in seconds."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"command failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def _patient_split(frame: pd.DataFrame, share: float, seed: int) -> np.ndarray:
    """True for the rows of `share` of the patients of each class (a patient's class: its images' majority)."""
    positive = frame.groupby("patient_id")["label"].agg(lambda s: (s == "COVID").mean() > 0.5)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for cls in (True, False):
        names = sorted(positive.index[positive == cls])
        held |= set(rng.choice(np.array(names, dtype=object), round(share * len(names)), replace=False))
    return frame["patient_id"].isin(held).to_numpy()


def manifests(data: Path, folder: Path) -> dict[str, Path]:
    """Index the two data sets once, then derive the protocol manifests from them (all written under `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.csv" for name in ("sarscov2-ct", "ucsd-covid-ct")}
    for name, path in paths.items():
        if not path.is_file():
            run([COVIDSCAN, "data", "index", str(data / name), "--kind", name, "-o", str(path)], folder / "index.log")
    ucsd = pd.read_csv(paths["ucsd-covid-ct"], keep_default_na=False)
    train, val = ucsd[ucsd["official_split"] == "train"].copy(), ucsd[ucsd["official_split"] == "val"].copy()
    paths["ucsd-train"], paths["ucsd-val"], paths["p2"] = folder / "ucsd-train.csv", folder / "ucsd-val.csv", folder / "p2.csv"
    _write(train, paths["ucsd-train"])
    _write(val, paths["ucsd-val"])
    train["split"] = np.where(_patient_split(train, 0.2, seed=0), "val", "train")
    val["split"] = "test"
    p2 = pd.concat([train, val], ignore_index=True)
    p2["group"] = p2["patient_id"]
    _write(p2, paths["p2"])
    return paths


def _write(frame: pd.DataFrame, path: Path) -> None:
    """Atomic (two bench processes may share the manifests folder): a reader never sees a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


def p4_manifests(p1_run: Path, paths: dict[str, Path], folder: Path) -> tuple[Path, Path]:
    """P4: P1's sarscov2-ct train/validation rows + P2's UCSD rows; P1's sarscov2-ct test rows as an external set."""
    sars = pd.read_csv(p1_run / "manifest.csv", keep_default_na=False)
    p2 = pd.read_csv(paths["p2"], keep_default_na=False)
    combined = pd.concat([sars[sars["split"] != "test"], p2], ignore_index=True).fillna("")
    held_out = sars[sars["split"] == "test"].drop(columns=["split"])
    _write(combined, folder / "p4.csv")
    _write(held_out, folder / "sarscov2-ct-heldout.csv")
    return folder / "p4.csv", folder / "sarscov2-ct-heldout.csv"


def protocol_commands(
    protocol: str, config: list[str], sets: list[str], paths: dict[str, Path], out: Path, draws: tuple[int, ...] = P5_DRAWS
) -> list[tuple[Path, list[str]]]:
    """(run folder, command) pairs of one protocol."""
    overrides = [arg for item in QUICK + sets for arg in ("--set", item)]
    train = [COVIDSCAN, "train", "--quiet", *config, *overrides]
    if protocol == "P1":
        return [(out / "P1", train + [str(paths["sarscov2-ct"]), "--set", "split.by=cluster", "--external", str(paths["ucsd-covid-ct"]),
                                      "--external", str(paths["ucsd-val"]), "-o", str(out / "P1")])]
    if protocol == "P2":
        return [(out / "P2", train + [str(paths["p2"]), "-o", str(out / "P2")])]
    if protocol == "P3":
        return [(out / "P3", [COVIDSCAN, "cv", "--quiet", *config, *overrides, "--set", "split.by=cluster", "--folds", "5",
                              str(paths["sarscov2-ct"]), "-o", str(out / "P3")])]
    if protocol == "P4":
        p4, held_out = p4_manifests(out / "P1", paths, paths["p2"].parent)
        return [(out / "P4", train + [str(p4), "--set", "train.balance_sources=true", "--external", str(held_out),
                                      "--external", str(paths["ucsd-val"]), "-o", str(out / "P4")])]
    finetune = [arg for item in QUICK + [s for s in sets if s.startswith("train.threads")] for arg in ("--set", item)]
    return [(out / "P5" / f"k{k}-d{d}", [COVIDSCAN, "finetune", "--quiet", str(out / "P1"), str(paths["ucsd-train"]), "--patients", str(k),
                                         "--draw", str(d), "--external", str(paths["ucsd-val"]), *finetune, "-o", str(out / "P5" / f"k{k}-d{d}")])
            for k in P5_PATIENTS for d in draws]


# ---------------------------------------------------------------- tables


def _ci(result: dict, name: str) -> str:
    value, band = result["metrics"].get(name, math.nan), (result.get("ci") or {}).get(name)
    return f"{value:.3f} [{band['low']:.3f}–{band['high']:.3f}]" if band else f"{value:.3f}"


def _sets(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["evaluation"]["sets"]


def _row(protocol: str, what: str, result: dict, seconds: float | None) -> dict[str, str]:
    patient = result.get("patient_level") or {}
    m = result["metrics"]
    return {
        "protocol": protocol, "evaluated on": what, "slice AUC": _ci(result, "auc"), "F1": _ci(result, "f1"),
        "sensitivity / specificity": f"{m['sensitivity']:.3f} / {m['specificity']:.3f}",
        "patient AUC": _ci(patient, "auc") if "metrics" in patient else "n/a (no patient IDs)",
        "refused": f"{result['gate']['refused']} / {result['gate']['refused'] + result['n']}",
        "wall min": f"{seconds / 60:.1f}" if seconds else "",
    }


def pooled_cv(folder: Path) -> tuple[str, str]:
    """P3: AUC of the pooled out-of-fold predictions (CI clustered by split group) and the leakage figures per fold."""
    from covidscan.evaluate.intervals import clustered_auc

    frames, leaks = [], []
    for fold in sorted(folder.glob("fold-*")):
        predictions = pd.read_csv(fold / "test_predictions.csv", keep_default_na=False)
        frames.append(predictions[predictions["accepted"].astype(str) == "True"])
        leak = json.loads((fold / "metrics.json").read_text())["split"]["leakage_test"]
        leaks.append(f"{leak['near_duplicates']}/{leak['test_images']}")
    pooled = pd.concat(frames)
    positive = [c for c in pooled.columns if c.startswith("p_")][-1]
    auc = clustered_auc((pooled["label"] == positive[2:]).to_numpy(), pooled[positive].to_numpy(float), pooled["group"].astype(str).to_numpy())
    return f"{auc['value']:.3f} [{auc['low']:.3f}–{auc['high']:.3f}]", ", ".join(leaks)


def protocol_rows(name: str, out: Path) -> list[dict[str, str]]:
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else {}
    rows = []
    if (out / "P1" / "metrics.json").is_file():
        sets = _sets(out / "P1")
        rows += [_row("P1", "sarscov2-ct test (cluster split; selection side)", sets["in-domain test"], timing.get("P1")),
                 _row("P1", "ucsd-covid-ct, all (zero-shot)", sets["ucsd-covid-ct"], None),
                 _row("P1", "ucsd-covid-ct official validation part (zero-shot)", sets["ucsd-val"], None)]
    if (out / "P2" / "metrics.json").is_file():
        rows.append(_row("P2", "ucsd-covid-ct official validation part (trained on the official training part)", _sets(out / "P2")["in-domain test"], timing.get("P2")))
    if (out / "P3" / "cv.json").is_file():
        cv = json.loads((out / "P3" / "cv.json").read_text())
        auc, leaks = pooled_cv(out / "P3")
        rows.append({"protocol": "P3", "evaluated on": f"sarscov2-ct, 5 cluster folds (leakage figure per fold: {leaks})",
                     "slice AUC": f"{auc} pooled; {cv['auc']['mean']:.3f} ± {cv['auc']['sd']:.3f} per fold",
                     "F1": f"{cv['f1']['mean']:.3f} ± {cv['f1']['sd']:.3f}",
                     "sensitivity / specificity": f"{cv['sensitivity']['mean']:.3f} / {cv['specificity']['mean']:.3f}",
                     "patient AUC": "n/a (no patient IDs)", "refused": str(sum(int(f["refused_by_gate"]) for f in cv["per_fold"])),
                     "wall min": f"{timing['P3'] / 60:.1f}" if "P3" in timing else ""})
    if (out / "P4" / "metrics.json").is_file():
        sets = _sets(out / "P4")
        rows += [_row("P4", "ucsd-covid-ct official validation part (multi-source)", sets["in-domain test"], timing.get("P4")),
                 _row("P4", "sarscov2-ct held-out groups (P1's test part)", sets["sarscov2-ct-heldout"], None)]
    runs = sorted((out / "P5").glob("k*-d*/metrics.json")) if (out / "P5").is_dir() else []
    by_k: dict[int, list[tuple[float, float]]] = {}
    for metrics in runs:
        k = int(metrics.parent.name[1:].split("-")[0])
        sets = _sets(metrics.parent)
        by_k.setdefault(k, []).append((sets["ucsd-val"]["metrics"]["auc"], sets["in-domain test"]["metrics"]["auc"]))
    for k, values in sorted(by_k.items()):
        ucsd, source = np.array(values).T
        rows.append({"protocol": "P5", "evaluated on": f"ucsd-covid-ct official validation part, k = {k} patients ({len(values)} draws)",
                     "slice AUC": f"{ucsd.mean():.3f} ± {ucsd.std(ddof=1) if len(ucsd) > 1 else 0:.3f} (draws: {', '.join(f'{v:.3f}' for v in ucsd)})",
                     "F1": "", "sensitivity / specificity": "", "patient AUC": "",
                     "refused": f"sarscov2-ct test AUC after: {source.mean():.3f}", "wall min": f"{timing['P5'] / 60:.1f}" if k == min(by_k) and "P5" in timing else ""})
    return [{"name": name, **row} for row in rows]


def ablation_row(name: str, out: Path) -> dict[str, str] | None:
    if not (out / "P1" / "metrics.json").is_file():
        return None
    p1 = _sets(out / "P1")
    p2 = _sets(out / "P2")["in-domain test"] if (out / "P2" / "metrics.json").is_file() else None
    return {"name": name, "P1 ucsd-covid-ct slice AUC": _ci(p1["ucsd-covid-ct"], "auc"),
            "P1 ucsd-covid-ct patient AUC": _ci(p1["ucsd-covid-ct"]["patient_level"], "auc"),
            "P1 ucsd refused": f"{p1['ucsd-covid-ct']['gate']['refused']} / {p1['ucsd-covid-ct']['gate']['refused'] + p1['ucsd-covid-ct']['n']}",
            "P2 slice AUC": _ci(p2, "auc") if p2 else "not run", "P2 F1": _ci(p2, "f1") if p2 else "",
            "P3 (one cluster split) AUC": _ci(p1["in-domain test"], "auc"),
            "P3 5-fold pooled AUC": pooled_cv(out / "P3")[0] if (out / "P3" / "fold-1").is_dir() else "not run"}


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def _seed_groups(out: Path, protocol: str) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for run in sorted(out.glob(f"*-seed*/{protocol}/metrics.json")):
        name, _, seed = run.parent.parent.name.rpartition("-seed")
        if seed.isdigit():
            groups.setdefault(name, []).append(run.parent)
    return groups


def p1_seed_rows(out: Path) -> list[dict[str, str]]:
    """P1 of one recipe trained with several seeds on the same cluster split: is a zero-shot gain more than training noise?"""
    rows = []
    for name, runs in _seed_groups(out, "P1").items():
        sets = [_sets(r) for r in runs]
        ucsd = [s["ucsd-covid-ct"]["metrics"]["auc"] for s in sets]
        rows.append({"recipe": name, "seeds": str(len(runs)), "sarscov2-ct test AUC": _spread([s["in-domain test"]["metrics"]["auc"] for s in sets]),
                     "P1 ucsd-covid-ct slice AUC": f"{_spread(ucsd)} ({', '.join(f'{v:.3f}' for v in ucsd)})",
                     "P1 ucsd-covid-ct patient AUC": _spread([s["ucsd-covid-ct"]["patient_level"]["metrics"]["auc"] for s in sets]),
                     "P1 ucsd official validation slice AUC": _spread([s["ucsd-val"]["metrics"]["auc"] for s in sets])})
    return rows


def p2_seed_rows(out: Path) -> list[dict[str, str]]:
    """P2 of the same recipe trained with several seeds (names NAME-seedN): training noise is as large as most
    differences between recipes on 93 validation images, so recipes are compared on their seed means.
    The selection-side validation AUC (the kept epoch's, on the training part's own validation patients) is shown
    beside the test figure: a recipe chosen on the official validation part alone would be chosen on its test part."""
    rows = []
    for name, runs in _seed_groups(out, "P2").items():
        metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
        tests = [m["evaluation"]["sets"]["in-domain test"] for m in metrics]
        auc = [t["metrics"]["auc"] for t in tests]
        selection = [m["training"]["selection"].get("kept_val_auc", math.nan) for m in metrics]
        rows.append({"recipe": name, "seeds": str(len(runs)), "selection-side validation AUC": _spread(selection),
                     "P2 slice AUC": f"{_spread(auc)} ({', '.join(f'{v:.3f}' for v in auc)})",
                     "P2 patient AUC": _spread([t["patient_level"]["metrics"]["auc"] for t in tests]),
                     "P2 F1": _spread([t["metrics"]["f1"] for t in tests]),
                     "sensitivity / specificity": f"{np.mean([t['metrics']['sensitivity'] for t in tests]):.3f} / "
                                                  f"{np.mean([t['metrics']['specificity'] for t in tests]):.3f}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", action="append", choices=PROTOCOLS, help="repeatable; default: all five")
    parser.add_argument("--config", type=Path, help="the recipe (default: covidscan's defaults)")
    parser.add_argument("--name", default="", help="folder under --out (default: the config's stem)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. train.threads=2 (repeatable)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--draw", type=int, action="append", help="P5: only these draws (to share the draws between two processes)")
    parser.add_argument("--table", action="store_true", help="print the tables of every name under --out and exit")
    parser.add_argument("--seeds", action="store_true", help="print P1 and P2 over seeds (names NAME-seedN) and exit")
    args = parser.parse_args()
    if args.seeds:
        print(markdown_table(p1_seed_rows(args.out)))
        print()
        print(markdown_table(p2_seed_rows(args.out)))
        return
    if args.table:
        names = sorted(p.parent.name for p in args.out.glob("*/P1"))
        print(markdown_table([row for n in names for row in protocol_rows(n, args.out / n)]))
        print()
        print(markdown_table([row for n in names if (row := ablation_row(n, args.out / n))]))
        return
    name = args.name or (args.config.stem if args.config else "defaults")
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    paths = manifests(args.data, args.out / "manifests")
    config = ["--config", str(args.config)] if args.config else []
    timing_file = out / "timing.json"
    for protocol in args.protocol or PROTOCOLS:
        seconds = 0.0
        for folder, command in protocol_commands(protocol, config, args.sets, paths, out, tuple(args.draw or P5_DRAWS)):
            if (folder / "metrics.json").is_file() or (folder / "cv.json").is_file():  # finished runs are kept
                continue
            if folder.exists():  # an interrupted run starts again
                shutil.rmtree(folder)
            seconds += run(command, out / f"{protocol}.log")
        if seconds:
            timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
            timing_file.write_text(json.dumps({**timing, protocol: round(seconds + timing.get(protocol, 0.0), 1)}, indent=1))
    print(markdown_table(protocol_rows(name, out)))


if __name__ == "__main__":
    main()
