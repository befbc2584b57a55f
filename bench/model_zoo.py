"""Every backbone, with and without DeTraC decomposition, and soft/weighted/stacking ensembles on sarscov2-ct.

Usage (CPU form, 128 px, in the background; skips what is already finished):
  .venv/bin/python bench/model_zoo.py --train --zoo runs/zoo > runs/zoo/bench.log 2>&1 &
  .venv/bin/python bench/model_zoo.py --zoo runs/zoo            # the table from finished runs
GPU form: the same with --set data.image_size=224 (and the registered sizes) on a GPU machine.

All runs share one split: the similarity-cluster split of runs/zoo/split.csv (made by the project's own
`covidscan split`-equivalent the first time, or copied from an existing run with --split-from RUN).
The recipe is configs/sarscov2-cluster.yaml. Backbones without offline ImageNet weights start from random
weights (model.weights=none), which the table says. The "best single model" for the tests is chosen on the
validation loss, never on the test part; DeLong and McNemar tests use the split groups as clusters.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

SINGLES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "inception_v3", "resnet50", "densenet201", "vgg16"]
DECOMPOSED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "inception_v3", "resnet50", "densenet201", "vgg16"]
ENSEMBLES = {
    "lite": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
    "seed": ["vgg16", "inception_v3", "densenet201"],
}
METHODS = ("soft", "weighted", "stacking")
PLAN = [("single", b) for b in SINGLES[:5]] + [("ensemble", "lite")] + [("detrac", b) for b in DECOMPOSED[:4]]
# Random-initialised seed backbones (no offline ImageNet weights): the slowest runs on a CPU, trained with --extra.
EXTRA = [("single", "densenet201"), ("single", "vgg16"), ("ensemble", "seed")] + [("detrac", b) for b in DECOMPOSED[4:]]
COVIDSCAN = str(Path(sys.executable).with_name("covidscan"))


def weights_for(backbone: str) -> str:
    from covidscan.models.registry import get_backbone

    return "imagenet" if get_backbone(backbone).packaged_weights else "none"


def finished(run: Path) -> bool:
    return (run / "metrics.json").is_file() and "evaluation" in json.loads((run / "metrics.json").read_text())


def train(zoo: Path, manifest: Path, external: Path, backbone: str, decompose: bool, extra: list[str]) -> None:
    run = zoo / (backbone + ("-detrac" if decompose else ""))
    if finished(run):
        return
    if run.exists():
        shutil.rmtree(run)
    command = [COVIDSCAN, "train", str(manifest), "--config", "configs/sarscov2-cluster.yaml", "--external", str(external), "-o", str(run),
               "--set", f"model.backbone={backbone}", "--set", f"model.weights={weights_for(backbone)}", "--quick", "--quiet"]
    command += ["--set", "model.decompose=auto"] if decompose else []
    for item in extra:
        command += ["--set", item]
    print(f"=== {run.name} {time.strftime('%H:%M:%S')}", flush=True)
    if subprocess.run(command).returncode:
        print(f"=== {run.name} FAILED", flush=True)


def ensemble(zoo: Path, name: str, members: list[str], method: str) -> Path | None:
    out = zoo / f"ensemble-{name}-{method}"
    runs = [zoo / m for m in members]
    if finished(out) or not all(finished(r) for r in runs):
        return out if finished(out) else None
    if out.exists():
        shutil.rmtree(out)
    print(f"=== {out.name} {time.strftime('%H:%M:%S')}", flush=True)
    done = subprocess.run([COVIDSCAN, "ensemble", *map(str, runs), "-o", str(out), "--method", method, "--quick", "--quiet"])
    return out if done.returncode == 0 else None


def serve_latency(run: Path, image: Path, repeats: int = 50) -> float:
    """p50 ms of the exported bundle answering one image (resize + ONNX Runtime + gate + combination), 2 threads."""
    from covidscan.data.io import read_image
    from covidscan.export.onnx import export_run
    from covidscan.serve.predictor import load_bundle

    bundle_dir = run / "bundle"
    if not (bundle_dir / "model.json").is_file():
        export_run(run, bundle_dir)
    bundle = load_bundle(bundle_dir, threads=2)
    pixels = read_image(image).pixels
    for _ in range(5):
        bundle.analyse([pixels], heatmaps=False)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        bundle.analyse([pixels], heatmaps=False)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def _ci(result: dict[str, object], name: str) -> str:
    m, ci = result["metrics"], result.get("ci") or {}
    value = m[name]  # type: ignore[index]
    band = ci.get(name)  # type: ignore[union-attr]
    return f"{value:.3f} [{band['low']:.3f}–{band['high']:.3f}]" if band else f"{value:.3f}"


def table(zoo: Path, image: Path | None) -> str:
    from covidscan.evaluate.evaluation import compare_predictions

    rows_in: list[tuple[str, Path]] = []
    for backbone in SINGLES:
        rows_in.append((backbone, zoo / backbone))
        rows_in.append((backbone + " + DeTraC", zoo / (backbone + "-detrac")))
    for name in ENSEMBLES:
        for method in METHODS:
            rows_in.append((f"ensemble {name} ({method})", zoo / f"ensemble-{name}-{method}"))
    done = [(label, run) for label, run in rows_in if finished(run)]
    singles = [(label, run) for label, run in done if not label.startswith("ensemble")]
    best_label, best_run = min(singles, key=lambda item: float(json.loads((item[1] / "metrics.json").read_text())["training"]["best_val_loss"]))
    reference = pd.read_csv(best_run / "predictions" / "in-domain-test.csv", keep_default_na=False)
    rows = []
    for label, run in done:
        metrics = json.loads((run / "metrics.json").read_text())
        card = json.loads((run / "model.json").read_text())
        sets = metrics["evaluation"]["sets"]
        test, ucsd = sets["in-domain test"], sets.get("ucsd-covid-ct")
        training = metrics["training"]
        seconds = training["ensemble"]["training_seconds"] if "ensemble" in training else round(sum(r["seconds"] for r in _history(run)), 1)
        if run == best_run:
            tests = "(reference)"
        else:
            other = pd.read_csv(run / "predictions" / "in-domain-test.csv", keep_default_na=False)
            result = compare_predictions(reference, other, "p_COVID")
            tests = f"{result['delong']['p_value']:.3g} / {result['mcnemar']['p_value']:.3g}"  # type: ignore[index]
        members = card.get("members")
        weights = "; ".join(sorted({str(m["pretrained_from"]).split(":")[0] for m in members})) if members else str(card.get("pretrained_from", "")).split(":")[0]
        sub = card.get("labels", {}).get("outputs") if isinstance(card.get("labels"), dict) else None
        rows.append({
            "model": label, "weights": weights.replace("none (random initialisation)", "random"),
            "outputs": len(sub) if sub else len(card["classes"]),
            "val loss": f"{training['best_val_loss']:.3f}" if "best_val_loss" in training else f"{training['ensemble']['combiner']['validation_log_loss']:.3f} (combiner)",
            "accuracy": _ci(test, "accuracy"), "F1": _ci(test, "f1"), "AUC": _ci(test, "auc"),
            f"DeLong / McNemar p vs {best_label}": tests,
            "ucsd-covid-ct AUC": _ci(ucsd, "auc") if ucsd else "n/a",
            "refused (test / ucsd)": f"{test['gate']['refused']} / {ucsd['gate']['refused'] if ucsd else 'n/a'}",
            "training s": seconds,
            "serve p50 ms": f"{serve_latency(run, image):.1f}" if image is not None and (members or run == best_run) else "",
        })
    return markdown_table(rows)


def _history(run: Path) -> list[dict[str, float]]:
    path = run / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("runs/zoo"))
    parser.add_argument("--manifest", type=Path, default=Path("runs/sarscov2-cluster-cl2/manifest.csv"), help="manifest with the split column")
    parser.add_argument("--external", type=Path, default=Path("runs/real/ucsd-covid-ct.csv"))
    parser.add_argument("--train", action="store_true", help="train what is missing, then build the ensembles")
    parser.add_argument("--extra-runs", action="store_true", help="also the random-initialised seed backbones, their ensemble and DeTraC")
    parser.add_argument("--skip-decomposed", default="", help="comma-separated backbones whose decomposed run is skipped")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra overrides for every training run")
    parser.add_argument("--latency-image", type=Path, default=None, help="an image for the ensembles' serving latency")
    args = parser.parse_args()
    if args.train:  # cheapest and most telling first: a CPU session may end before the last random-init runs
        skip = set(filter(None, args.skip_decomposed.split(",")))
        for kind, item in PLAN + (EXTRA if args.extra_runs else []):
            if kind == "ensemble":
                for method in METHODS:
                    ensemble(args.zoo, str(item), ENSEMBLES[str(item)], method)
            elif not (kind == "detrac" and item in skip):
                train(args.zoo, args.manifest, args.external, str(item), kind == "detrac", args.extra)
    print(table(args.zoo, args.latency_image))


if __name__ == "__main__":
    main()
