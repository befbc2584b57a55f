"""Coverage of the 95 % confidence intervals on clustered synthetic scores: bootstrap (before) vs Wilson/Newcombe (after).

Usage: .venv/bin/python bench/ci_coverage.py [--studies 1000] [--boot-studies 300] [--boot 500]

Each scenario simulates many small studies (patients x slices, a shared
patient effect) and counts how often each interval contains the true value
of the simulated population; nominal is 0.95. CPU only, a few minutes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

from covidscan.evaluate.coverage import ClusteredScores, coverage
from covidscan.evaluate.intervals import binary_intervals
from covidscan.evaluate.stats import bootstrap_ci

SCENARIOS = {
    "6 patients/class x 6 slices": ClusteredScores(),
    "6 x 6, well separated (near 100 %)": ClusteredScores(shift=5.0),
    "12 x 6, strong patient effect": ClusteredScores(patients_per_class=12, patient_sd=2.0),
    "30 x 6": ClusteredScores(patients_per_class=30),
    "20 x 1 (independent images)": ClusteredScores(patients_per_class=20, slices=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000, help="simulated studies for the new intervals")
    parser.add_argument("--boot-studies", type=int, default=300, help="simulated studies for the bootstrap (slow)")
    parser.add_argument("--boot", type=int, default=500, help="bootstrap resamples per study")
    args = parser.parse_args()
    rows = []
    started = time.perf_counter()
    for name, model in SCENARIOS.items():
        for level in ("slice", "patient"):
            if level == "patient" and model.slices == 1:
                continue
            before = coverage(lambda y, s, g: bootstrap_ci(y, s, g, 0.5, args.boot), model, args.boot_studies, level)
            after = coverage(lambda y, s, g: binary_intervals(y, s, 0.5, g), model, args.studies, level)
            for metric in ("sensitivity", "specificity", "auc"):
                rows.append({
                    "scenario": name, "level": level, "metric": metric, "truth": f"{after[metric]['truth']:.3f}",
                    f"bootstrap ({args.boot_studies} studies)": f"{before[metric]['coverage']:.3f} (width {before[metric]['mean_width']:.2f})",
                    f"Wilson/Newcombe ({args.studies} studies)": f"{after[metric]['coverage']:.3f} (width {after[metric]['mean_width']:.2f})",
                })
            print(f"{name} / {level}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
