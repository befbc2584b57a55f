"""A model trained on one source, served to another source's studies: what the study answer says with and without
the evidence rule (issue 33's six-study scenario, reproduced with UCSD's patients as the unseen source).

    .venv/bin/python bench/unseen_source_studies.py BUNDLE MANIFEST [--min-images N] [--out FILE.json]

BUNDLE: an exported bundle (`covidscan export RUN`). MANIFEST: another source's manifest with patient IDs (e.g.
`covidscan data index ../shared/data/ucsd-covid-ct`); every patient's images form one study, analysed by the
bundle as the service analyses a study. "Before" is the study rule alone (any accepted slice answers, as covidscan
answered until the evidence rule); "now" is the model card's evidence rule, then its study rule. Prints a markdown
table for BENCHMARKS.md and, per answered study, nothing that identifies a patient.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

from covidscan.data.io import read_image  # noqa: E402
from covidscan.data.manifest import image_refs, load_manifest  # noqa: E402
from covidscan.decision import EvidenceRule, StudyAnswer, study_answer  # noqa: E402
from covidscan.evaluate.intervals import binary_intervals  # noqa: E402
from covidscan.explain.lung_mask import shows_lung  # noqa: E402
from covidscan.serve.predictor import load_bundle  # noqa: E402

BEFORE = EvidenceRule(max_refused_share=1.0, min_accepted=1, min_lung_share=0.0, chosen_on="the study rule alone")


def summary(name: str, answers: list[StudyAnswer], truth: list[bool], positive: str) -> dict[str, object]:
    answered = [i for i, a in enumerate(answers) if a.answered]
    y = np.array([truth[i] for i in answered])
    p = np.array([answers[i].probability for i in answered])
    auc = binary_intervals(y, p, 0.5, None)["auc"] if len(answered) and len(np.unique(y)) == 2 else {"value": math.nan, "low": math.nan, "high": math.nan}
    suspected = sum(answers[i].label == positive for i in answered)
    return {
        "rule": name, "studies": len(answers), "answered": len(answered),
        "not evaluable": sum(a.label == "not evaluable" for a in answers), "refused": sum(a.label == "refused" for a in answers),
        f"{positive} suspected (of them truly {positive})": f"{suspected} ({sum(answers[i].label == positive and truth[i] for i in answered)})",
        "study AUC on answered [95% CI]": f"{auc['value']:.3f} [{auc['low']:.3f}-{auc['high']:.3f}]" if not math.isnan(auc["value"]) else "n/a",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--min-images", type=int, default=1, help="Only studies (patients) with at least this many images.")
    args = parser.parse_args()
    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    frame = load_manifest(args.manifest)
    if (frame["patient_id"].astype(str) == "").any():
        raise SystemExit(f"{args.manifest}: every image needs a patient ID to form studies")
    positive = bundle.classes[-1]
    now, before, truth, sizes = [], [], [], []
    for _, rows in frame.groupby("patient_id", sort=True):
        if len(rows) < args.min_images:
            continue
        pixels = [read_image(path, index).pixels for path, index in image_refs(rows)]
        results = bundle.analyse(pixels, heatmaps=False)
        scores = [r.probabilities[positive] for r in results]
        accepted, lung = [r.in_distribution for r in results], [bool(r.lung) for r in results]
        now.append(bundle.study(results))
        before.append(study_answer(scores, accepted, lung, bundle.classes, bundle.study_rule, BEFORE))
        truth.append(bool((rows["label"] == positive).any()))
        sizes.append(len(rows))
    table = [summary("before: the study rule alone", before, truth, positive), summary("now: evidence rule, then study rule", now, truth, positive)]
    reasons: dict[str, int] = {}
    for answer in now:
        if answer.label == "not evaluable":
            key = answer.reason.split(" (")[0].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    print(f"bundle {args.bundle}; {len(now)} studies of {args.manifest.name} with at least {args.min_images} image(s) "
          f"(images per study: median {int(np.median(sizes))}, "
          f"max {max(sizes)}); evidence rule: {bundle.evidence_rule.describe()} ({bundle.evidence_rule.chosen_on}); "
          f"{time.perf_counter() - started:.0f} s")
    print(markdown_table(table))
    print("not evaluable, by reason: " + "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    print(f"validated statement beside every answer: {bundle.validated}")
    sample = [bundle.prepare(read_image(path, index).pixels) for path, index in image_refs(frame.head(200))]
    tick = time.perf_counter()
    for image in sample:
        shows_lung(image)
    print(f"lung check: {1000 * (time.perf_counter() - tick) / len(sample):.2f} ms per slice at {bundle.size} px input "
          f"({len(sample)} slices; 300 slices: {0.3 * (time.perf_counter() - tick) / len(sample) * 1000:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"table": table, "reasons": reasons, "evidence_rule": bundle.evidence_rule.to_json(),
                                        "validated": bundle.validated}, indent=1))


if __name__ == "__main__":
    main()
