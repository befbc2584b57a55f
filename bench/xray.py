"""Chest X-ray benchmark (issue 15): the seeds' X-ray claims as they were made, then measured honestly.

    .venv/bin/python bench/xray.py [--config configs/recommended.yaml] [--set k=v ...] [--table]

Reads ../shared/data/covid-cxr (ieee8023 with patient IDs; kermany-normal, children), writes runs/xray/:
  A  COVID-19 vs other findings inside ieee8023 (520 images, 313 patients): 5-fold CV grouped by patient, and the
     same CV over a random image split (how the seeds split); one patient-split training with the full report
     (heat maps, t-SNE).
  B  the "Frankenstein" pairing: ieee8023's COVID-19 images (adults, up to 512 px) + kermany-normal (children,
     224 x 224): the audit's shortcut warnings; a classifier on file properties alone (size, aspect, bytes, mode,
     format; logistic regression, 5 patient-grouped folds); the CNN with a random image split and with a patient
     split (full report: heat maps, t-SNE).
  C  three classes as the seeds merged them: COVID-19 (ieee8023) / other pneumonia (ieee8023) / normal (kermany
     children + ieee8023's 13 "No Finding"): a random image split (as the seeds) and a patient split; one-vs-rest
     AUC per class with patient-clustered CIs. Still a Frankenstein set: "normal" is almost only children.
Every figure is an AUC with a 95 % CI clustered by patient (pooled out-of-fold predictions for CV). Plain
covidscan commands, printed before they run; finished runs are kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402
from quality import COVIDSCAN, QUICK, _ci, _sets, _write, pooled_cv, run  # noqa: E402


def manifests(data: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    every = folder / "cxr-all.csv"
    if not every.is_file():
        run([COVIDSCAN, "data", "index", str(data / "ieee8023"), str(data / "kermany-normal"), "-o", str(every)], folder / "index.log")
    frame = pd.read_csv(every, keep_default_na=False)
    paths = {"ieee8023": folder / "ieee8023.csv", "frankenstein": folder / "frankenstein.csv", "three-class": folder / "three-class.csv"}
    ieee = _single_label_patients(frame[frame["source"] == "ieee8023"], "ieee8023")
    _write(ieee, paths["ieee8023"])
    _write(frame[(frame["source"] == "kermany-normal") | (frame["label"] == "COVID")], paths["frankenstein"])
    three = folder / "cxr-three-class-all.csv"
    if not three.is_file():
        run([COVIDSCAN, "data", "index", str(data / "ieee8023"), str(data / "kermany-normal"), "--labels", "COVID,normal,pneumonia",
             "-o", str(three)], folder / "index.log")
    _write(_single_label_patients(pd.read_csv(three, keep_default_na=False), "three classes"), paths["three-class"])
    return paths


def _single_label_patients(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """Patients whose images carry one label only (follow-ups with another finding are left out, and counted)."""
    labels_per_patient = frame.groupby("patient_id")["label"].nunique()
    mixed = set(labels_per_patient.index[labels_per_patient > 1])
    print(f"{what}: {len(mixed)} patients with images of more than one class left out ({frame['patient_id'].isin(mixed).sum()} images)")
    return frame[~frame["patient_id"].isin(mixed)]


def commands(paths: dict[str, Path], config: list[str], sets: list[str], out: Path) -> list[tuple[Path, list[str]]]:
    quick = [arg for item in QUICK + sets for arg in ("--set", item)]
    full = [arg for item in sets for arg in ("--set", item)]
    cv = [COVIDSCAN, "cv", "--quiet", *config, *quick, "--folds", "5"]
    train = [COVIDSCAN, "train", "--quiet", *config]
    return [
        (out / "A-cv-patient", cv + ["--set", "split.by=patient", str(paths["ieee8023"]), "-o", str(out / "A-cv-patient")]),
        (out / "A-cv-random", cv + ["--set", "split.by=random", str(paths["ieee8023"]), "-o", str(out / "A-cv-random")]),
        (out / "A-patient", train + full + ["--set", "split.by=patient", str(paths["ieee8023"]), "-o", str(out / "A-patient")]),
        (out / "B-random", train + quick + ["--set", "split.by=random", str(paths["frankenstein"]), "-o", str(out / "B-random")]),
        (out / "B-patient", train + full + ["--set", "split.by=patient", str(paths["frankenstein"]), "-o", str(out / "B-patient")]),
        (out / "B-audit", [COVIDSCAN, "audit", str(paths["frankenstein"]), "-o", str(out / "B-audit")]),
        (out / "C-random", train + quick + ["--set", "split.by=random", "--set", "data.labels=auto", str(paths["three-class"]), "-o", str(out / "C-random")]),
        (out / "C-patient", train + quick + ["--set", "split.by=patient", "--set", "data.labels=auto", str(paths["three-class"]), "-o", str(out / "C-patient")]),
    ]


def file_property_model(manifest: Path, out: Path) -> dict[str, object]:
    """AUC of logistic regression on file properties alone (no pixel seen), 5 folds grouped by patient."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from covidscan.evaluate.intervals import clustered_auc

    frame = pd.read_csv(manifest, keep_default_na=False)
    rows = []
    for path in frame["path"]:
        with Image.open(path) as img:
            width, height = img.size
            rows.append({"width": width, "height": height, "aspect": width / height, "kbytes": Path(path).stat().st_size / 1e3,
                         "mode_" + img.mode: 1, "format_" + str(img.format): 1})
    features = pd.DataFrame(rows).fillna(0)
    y = (frame["label"] == "COVID").to_numpy().astype(int)
    groups = frame["patient_id"].astype(str).to_numpy()
    scores = np.zeros(len(y))
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(features, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features.iloc[train], y[train])
        scores[test] = model.predict_proba(features.iloc[test])[:, 1]
    auc = clustered_auc(y.astype(bool), scores, groups)
    result = {"auc": auc, "features": list(features.columns), "images": len(y)}
    out.write_text(json.dumps(result, indent=1))
    return result


def _auc(value: dict[str, float]) -> str:
    return f"{value['value']:.3f} [{value['low']:.3f}–{value['high']:.3f}]"


def table(out: Path) -> str:
    rows = []

    def add(experiment: str, split: str, what: str, figure: str) -> None:
        rows.append({"experiment": experiment, "split": split, "evaluated on": what, "AUC [95 % CI]": figure})

    for name, split in (("A-cv-random", "random image split (as the seeds)"), ("A-cv-patient", "grouped by patient")):
        if (out / name / "fold-4").is_dir():
            auc, _ = pooled_cv(out / name)
            cv = json.loads((out / name / "cv.json").read_text())
            add("A: COVID-19 vs other findings, ieee8023", f"5-fold CV, {split}", "pooled out-of-fold predictions",
                f"{auc}; {cv['auc']['mean']:.3f} ± {cv['auc']['sd']:.3f} per fold")
    if (out / "A-patient" / "metrics.json").is_file():
        add("A: COVID-19 vs other findings, ieee8023", "one patient split (full report)", "test patients", _ci(_sets(out / "A-patient")["in-domain test"], "auc"))
    if (out / "B-shortcut.json").is_file():
        shortcut = json.loads((out / "B-shortcut.json").read_text())
        add("B: Frankenstein (ieee8023 COVID-19 + kermany children)", "5 folds grouped by patient",
            "file properties only (size, aspect, bytes, mode, format): no pixel seen", _auc(shortcut["auc"]))
    for name, split in (("B-random", "random image split"), ("B-patient", "grouped by patient")):
        if (out / name / "metrics.json").is_file():
            add("B: Frankenstein (ieee8023 COVID-19 + kermany children)", f"one {split}", "test part, CNN", _ci(_sets(out / name)["in-domain test"], "auc"))
    for name, split in (("C-random", "random image split (as the seeds)"), ("C-patient", "grouped by patient")):
        if (out / name / "metrics.json").is_file():
            test = _sets(out / name)["in-domain test"]
            per_class = test["metrics"]["per_class"]
            figure = "; ".join(f"{c} {_auc({'value': v['auc'], **v['auc_ci']})}" for c, v in per_class.items())
            add("C: COVID-19 / pneumonia / normal, merged sources", f"one {split}", "test part, one-vs-rest AUC per class",
                f"{figure}; macro F1 {test['metrics']['macro_f1']:.3f}")
    text = markdown_table(rows)
    audit = out / "B-audit" / "audit.json"
    if audit.is_file():
        risks = [r for r in json.loads(audit.read_text()).get("shortcut_risks", []) if r.get("warning")]
        text += "\n\nAudit warnings on the Frankenstein pairing (property: one-property AUC; pure values):\n" + "\n".join(
            f"- {r['property']}: {r['auc']:.2f}" + "".join(f"; {v['value']} -> {v['class']} in {100 * v['purity']:.0f} % of {v['images']} images"
                                                      for v in r.get("rules", [])[:1]) for r in risks[:8])
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/recommended.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/covid-cxr"))
    parser.add_argument("--out", type=Path, default=Path("runs/xray"))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: not found; the X-ray benchmark needs ../shared/data/covid-cxr")
    paths = manifests(args.data, args.out / "manifests")
    if not (args.out / "B-shortcut.json").is_file():
        file_property_model(paths["frankenstein"], args.out / "B-shortcut.json")
    for folder, command in commands(paths, ["--config", args.config], args.sets, args.out):
        done = (folder / "metrics.json").is_file() or (folder / "cv.json").is_file() or (folder / "audit.json").is_file()
        if not done:
            run(command, args.out / f"{folder.name}.log")
    print(table(args.out))


if __name__ == "__main__":
    main()
