"""Intervals of an evaluated run, before (percentile bootstrap) and after (Wilson/Newcombe, patients as clusters).

Usage: .venv/bin/python bench/intervals_before_after.py RUN [RUN ...] [--boot 1000]

Reads RUN/predictions/*.csv (written by `covidscan evaluate`), takes the images
the gate accepted, and prints both kinds of 95 % interval at threshold 0.5,
slice level (split groups or patients as clusters) and study level (the
model card's study rule), so the change of method can be checked on real runs.
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

from covidscan.decision import study_scores
from covidscan.evaluate.intervals import binary_intervals
from covidscan.evaluate.stats import bootstrap_ci

METRICS = ("sensitivity", "specificity", "auc")


def _show(ci: dict[str, float]) -> str:
    return f"{ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        card = json.loads((run / "model.json").read_text())
        positive = card["classes"][-1]
        for path in sorted((run / "predictions").glob("*.csv")):
            frame = pd.read_csv(path, keep_default_na=False)
            if "accepted" in frame.columns:
                frame = frame[frame["accepted"].astype(str) == "True"]
            y = (frame["label"].astype(str) == positive).to_numpy()
            score = frame[f"p_{positive}"].to_numpy(float)
            column = "group" if "group" in frame.columns and (frame["group"].astype(str) != "").all() else "patient_id"
            groups = frame[column].astype(str).to_numpy()
            levels = {"slices": (y, score, groups)}
            patients = frame["patient_id"].astype(str).to_numpy()
            if (patients != "").all() and len(np.unique(patients)) < len(patients):
                _, labels, studies = study_scores(patients, y, score, card.get("study_rule") or {"aggregation": "mean"})
                levels["studies"] = (labels, studies, np.arange(len(labels)).astype(str))
            for level, (yy, ss, gg) in levels.items():
                before = bootstrap_ci(yy, ss, gg, 0.5, args.boot)
                after = binary_intervals(yy, ss, 0.5, gg)
                for metric in METRICS:
                    rows.append({"run": run.name, "set": path.stem, "level": f"{level} ({len(np.unique(gg))} clusters)", "metric": metric,
                                 "bootstrap (before)": _show(before[metric]), "Wilson/Newcombe (after)": _show(after[metric])})
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
