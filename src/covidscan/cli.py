"""covidscan command line: a thin layer over the package, one sub-command per stage."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from covidscan import DISCLAIMER
from covidscan.errors import CovidscanError
from covidscan.serve import DEFAULT_MAX_UPLOAD_MB

if TYPE_CHECKING:
    import numpy as np

    from covidscan.decision import StudyAnswer

app = typer.Typer(
    help="covidscan: COVID-19 detection on chest CT/X-ray with transfer-learned CNNs, "
    "evaluated without patient leakage. Decision support only, not a diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make and index data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def _log(message: str) -> None:
    """Print plain text: brackets in messages (paths, '[frozen]') are not rich markup."""
    console.print(message, markup=False)


def _print_version(value: bool) -> None:
    if value:
        from covidscan import __version__

        _log(f"covidscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """covidscan: COVID-19 detection on chest CT/X-ray with transfer-learned CNNs, evaluated without patient leakage.
    Decision support only, not a diagnosis."""


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write ROOT/<class>/<patient>/<slice>.png into.")],
    patients: Annotated[int, typer.Option(help="Synthetic patients per class.")] = 24,
    slices: Annotated[int, typer.Option(help="Slices per patient.")] = 6,
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
) -> None:
    """Generate the synthetic chest-CT-like phantom data set (deterministic for a seed)."""
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset

    generate_phantom_dataset(out, PhantomSpec(patients, slices, size, seed))
    _log(f"wrote {2 * patients * slices} phantom images of {2 * patients} patients to {out}")


@data_app.command("index")
def data_index(
    roots: Annotated[list[Path], typer.Argument(help="Data folders or CSV files (path,label[,patient_id]); several are merged.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")] = Path("manifest.csv"),
    kind: Annotated[str, typer.Option(help="auto, folder, csv, sarscov2-ct, ucsd-covid-ct, ieee8023 or kermany-normal.")] = "auto",
    labels: Annotated[str, typer.Option(help="'binary' (COVID vs non-COVID), 'auto' (folder names) or 'A,B,C'.")] = "binary",
    source: Annotated[Optional[str], typer.Option(help="Name of your own data set (default: the folder or CSV name); reports and the model card use it.")] = None,
    description: Annotated[Optional[str], typer.Option(help="One line on where your data set comes from (hospital, scanner, period, label source); the report and the model card state it.")] = None,
) -> None:
    """Index data folders, CSV lists or known public sets into one manifest (one row per image or slice).

    A known public set is recognised only when its files match the release; any other folder is your own set,
    named by --source.
    """
    from covidscan.data.manifest import save_manifest
    from covidscan.data.public_sets import describe_source, index_sources

    frame = index_sources(list(roots), kind, labels, source)
    if description is not None:
        frame = describe_source(frame, description)
    save_manifest(frame, out)
    counts = frame.groupby(["source", "label"]).size().to_dict()
    patients = int((frame["patient_id"] != "").sum())
    _log(f"indexed {len(frame)} images {counts}; {patients} with a patient ID -> {out}")


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="sarscov2-ct (Kaggle API), ucsd-covid-ct or ieee8023.")],
    dest: Annotated[Path, typer.Option(help="Folder to download and extract into.")] = Path("data"),
    url: Annotated[Optional[str], typer.Option(help="Another archive URL (zip) to fetch instead.")] = None,
) -> None:
    """Fetch a public data set from its original source (needs network; checksums verified or recorded)."""
    from covidscan.data.download import REMOTE_SETS, download

    folder = download(name, dest, url)
    citation = REMOTE_SETS[name].citation if name in REMOTE_SETS else ""
    _log(f"extracted {name} -> {folder}" + (f"\ncite: {citation}" if citation else ""))


@app.command("audit")
def audit_command(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (from `covidscan data index`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for audit.json, audit.html, manifest.audited.csv.")] = Path("audit"),
    drop: Annotated[str, typer.Option(help="Write clean_manifest.csv without images flagged as any of: corrupt,quality,duplicate,conflict.")] = "",
    dark: Annotated[float, typer.Option(help="Mean intensity below which an image is too dark.")] = 0.05,
    bright: Annotated[float, typer.Option(help="Mean intensity above which an image is too bright.")] = 0.95,
    low_contrast: Annotated[float, typer.Option(help="Intensity std below which contrast is too low.")] = 0.03,
    min_side: Annotated[int, typer.Option(help="Smallest acceptable image side in pixels.")] = 64,
    max_aspect: Annotated[float, typer.Option(help="Largest acceptable aspect ratio.")] = 3.0,
    near_bits: Annotated[int, typer.Option(help="Near duplicate: perceptual hashes differing in at most this many of 256 bits.")] = 30,
    shortcut_auc: Annotated[float, typer.Option(help="Warn when one file property separates classes with at least this AUC.")] = 0.70,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Audit a data set: unreadable files, quality, duplicates, class balance and shortcut risks."""
    from covidscan.data.audit import AuditThresholds, drop_flagged, run_audit
    from covidscan.data.audit_report import write_audit
    from covidscan.data.manifest import load_manifest, save_manifest

    thresholds = AuditThresholds(dark, bright, low_contrast, min_side, max_aspect, near_bits, shortcut_auc)
    result = run_audit(load_manifest(manifest), thresholds, show=not quiet)
    dropped = None
    if drop:
        clean, dropped = drop_flagged(result.properties, [k.strip() for k in drop.split(",") if k.strip()])
        save_manifest(clean, out / "clean_manifest.csv")
    paths = write_audit(result, out, manifest.name, dropped)
    for warning in result.summary["warnings"]:  # type: ignore[union-attr]
        console.print(f"[bold red]warning:[/bold red] {escape(str(warning))}")
    _log(f"audited {result.summary['images']} images in {result.summary['seconds']} s -> {paths['html']}, {paths['json']}")
    if dropped is not None:
        _log(f"dropped {sum(dropped.values())} images {dropped} -> {out / 'clean_manifest.csv'}")


@app.command("split")
def split_command(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write, with group and split (or fold) columns.")],
    by: Annotated[str, typer.Option(help="auto (patient when every image has an ID, else cluster), patient, cluster (image-similarity groups) or random (leaky, demo only).")] = "auto",
    test_size: Annotated[float, typer.Option(help="Share held out for testing.")] = 0.2,
    val_size: Annotated[float, typer.Option(help="Share for validation (model selection).")] = 0.2,
    folds: Annotated[int, typer.Option(help="Write K cross-validation folds (column 'fold') instead of train/val/test.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    groups: Annotated[Optional[int], typer.Option(help="Cluster split: number of similarity groups (default 2*sqrt(N)).")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine similarity at which two images count as near duplicates.")] = 0.92,
    embeddings: Annotated[Optional[Path], typer.Option(help="Cache file (.npz) for image embeddings; reused when it matches.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Split without leakage (by patient or similarity cluster) and report the split's leakage figure."""
    from covidscan import atomic
    from covidscan.data.manifest import load_manifest, save_manifest
    from covidscan.data.split import split_manifest
    from covidscan.models.embed import manifest_embeddings

    frame = load_manifest(manifest)
    vectors = manifest_embeddings(frame, embeddings or out.with_suffix(".embeddings.npz"), show=not quiet)
    result, report = split_manifest(frame, by, vectors, test_size, val_size, seed, folds, groups, threshold, str(manifest))
    save_manifest(result, out)
    atomic.write_json(out.with_suffix(".split.json"), report)
    if report["warning"]:
        console.print(f"[bold red]warning:[/bold red] {escape(str(report['warning']))}")
    _log(f"split by {report['by']}: {report['groups']} groups -> {out} (+ {out.with_suffix('.split.json').name})")
    leaks = report.get("leakage_per_fold") or [report["leakage_test"]]
    for k, leak in enumerate(leaks):  # type: ignore[arg-type]
        name = f"fold {k}" if folds else "test"
        flag = "  LEAKY SPLIT" if leak["flagged"] else ""
        _log(f"leakage ({name}): {leak['near_duplicates']}/{leak['test_images']} held-out images ({leak['share']:.1%}) have a near duplicate "
             f"(cosine >= {leak['threshold']:.3f}) in train; median nearest-neighbour similarity {leak['median_nn_similarity']:.3f}{flag}")


@app.command("train")
def train_command(
    manifest: Annotated[Optional[Path], typer.Argument(help="Manifest CSV (split by patient when it has no split column).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder to create.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (see src/covidscan/config.py for keys).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. --set train.epochs=5 (repeatable).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Resume the run in this folder from its last checkpoint.")] = None,
    external: Annotated[Optional[list[Path]], typer.Option(help="Also evaluate on this manifest of another data set (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Quick evaluation: every metric with its CI, no heat maps or t-SNE, 200 bootstrap resamples.")] = False,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Skip the data audit (shortcuts, duplicates, label conflicts) that runs before training.")] = False,
) -> None:
    """Audit the data, fine-tune a pretrained backbone; evaluate on the held-out test patients and any --external data sets."""
    from covidscan.config import QUICK_EVALUATION, load_config

    set_ = (QUICK_EVALUATION if quick else []) + list(set_ or [])
    from covidscan.data.manifest import load_manifest
    from covidscan.pipeline import train_run

    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise CovidscanError(f"{resume}: not a run folder to resume (no config.yaml)")
        cfg = load_config(resume / "config.yaml", set_)
        frame = load_manifest(resume / "manifest.csv")
        run_dir = resume
    else:
        if manifest is None or out is None:
            raise CovidscanError("train needs a MANIFEST and --out RUN_FOLDER (or --resume RUN_FOLDER)")
        from covidscan.train.distributed import env_rank

        # Under torchrun only rank 0 checks: the others may already see its first files.
        if env_rank() == 0 and out.exists() and any(out.iterdir()):
            raise CovidscanError(f"{out}: run folder exists and is not empty; use --resume {out} or another --out")
        cfg = load_config(config, set_)
        frame = load_manifest(manifest)
        run_dir = out
    externals = _external_manifests(external or [])
    if cfg.ensemble.members:
        from covidscan.pipeline import train_ensemble

        metrics = train_ensemble(frame, cfg, run_dir, show_progress=not quiet, log=_log, externals=externals, audit=not no_audit)  # type: ignore[arg-type]
    else:
        metrics = train_run(frame, cfg, run_dir, resume=resume is not None, show_progress=not quiet, log=_log, externals=externals,  # type: ignore[arg-type]
                            audit=not no_audit)
    from covidscan.train.distributed import env_rank

    if env_rank() == 0:
        _print_summary(metrics, run_dir)


def _external_manifests(paths: list[Path]) -> dict[str, object]:
    """name (the file's stem) -> manifest frame."""
    from covidscan.data.manifest import load_manifest

    out: dict[str, object] = {}
    for path in paths:
        if path.stem in out:
            raise CovidscanError(f"{path}: two external manifests share the name {path.stem!r}; rename one")
        out[path.stem] = load_manifest(path)
    return out


@app.command("ensemble")
def ensemble_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders trained on the same split (e.g. one per backbone).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Ensemble run folder to create.")],
    method: Annotated[str, typer.Option(help="soft (mean), weighted (weights fitted on validation) or stacking (logistic regression on validation).")] = "stacking",
    external: Annotated[Optional[list[Path]], typer.Option(help="Also evaluate on this manifest (the first member's external sets are included).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Quick evaluation: every metric with its CI, no heat maps or t-SNE.")] = False,
) -> None:
    """Combine trained runs into one model; evaluate, compare, predict, export and serve it like any run."""
    from covidscan.config import ENSEMBLE_METHODS, QUICK_EVALUATION, load_config
    from covidscan.ensemble import build_ensemble

    if method not in ENSEMBLE_METHODS:
        raise CovidscanError(f"--method must be one of {', '.join(ENSEMBLE_METHODS)}, got {method!r}")
    if out.exists() and any(out.iterdir()):
        raise CovidscanError(f"{out}: folder exists and is not empty; choose another --out")
    for run in runs:
        if not (run / "config.yaml").is_file():
            raise CovidscanError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(runs[0] / "config.yaml", QUICK_EVALUATION if quick else []).evaluate
    metrics = build_ensemble(list(runs), out, method, cfg, not quiet, _log, _external_manifests(external or []))  # type: ignore[arg-type]
    _print_summary(metrics, out)
    console.print(DISCLAIMER, style="italic", markup=False)


@app.command("adapt")
def adapt_command(
    run: Annotated[Path, typer.Argument(help="Run folder of a trained network.")],
    unlabelled: Annotated[Path, typer.Argument(help="Manifest of the new hospital's images (labels, if any, are not used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapted run folder to create.")],
    method: Annotated[str, typer.Option(help="adabn: batch-norm statistics only; tent: also train batch-norm scale/shift by entropy minimisation.")] = "adabn",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Adapt a model to a new hospital's unlabelled images (AdaBN or TENT); the gate is refitted there, calibration reset."""
    from covidscan.adapt import adapt_run
    from covidscan.data.manifest import load_manifest

    metrics = adapt_run(run, load_manifest(unlabelled), out, unlabelled.stem, not quiet, _log, method)
    _print_summary(metrics, out)
    console.print(DISCLAIMER, style="italic", markup=False)


@app.command("pretrain")
def pretrain_command(
    unlabelled: Annotated[Path, typer.Argument(help="Manifest of unlabelled slices (labels, if any, are not used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Weights file to write (.safetensors); a .json record goes beside it.")],
    backbone: Annotated[str, typer.Option(help="Backbone to pretrain (covidscan models).")] = "efficientnet_lite0",
    size: Annotated[int, typer.Option(help="Image size; train with the same data.image_size.")] = 128,
    preprocess: Annotated[str, typer.Option(help="data.preprocess of the images; train with the same.")] = "none",
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=8)] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Self-supervised (SimCLR) pretraining of a backbone on unlabelled slices; train with --set model.weights=OUT."""
    from covidscan.data.io import load_image_array
    from covidscan.data.manifest import image_refs, load_manifest
    from covidscan.data.preprocess import PREPROCESSING
    from covidscan.models.pretrain import pretrain_file
    from covidscan.models.registry import get_backbone

    if preprocess not in PREPROCESSING:
        raise CovidscanError(f"--preprocess must be one of {', '.join(PREPROCESSING)}, got {preprocess!r}")
    get_backbone(backbone)  # an unknown name fails before any image is read
    images = load_image_array(image_refs(load_manifest(unlabelled)), size, f"loading {unlabelled.name}", not quiet, preprocess)
    pretrain_file(images, out, backbone, size, unlabelled.stem, epochs=epochs, batch_size=batch_size, lr=lr,
                  preprocess=preprocess, seed=seed, log=_log)


@app.command("finetune")
def finetune_command(
    run: Annotated[Path, typer.Argument(help="Run folder of a trained network.")],
    labelled: Annotated[Path, typer.Argument(help="Manifest of the new hospital's labelled images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Fine-tuned run folder to create.")],
    patients: Annotated[int, typer.Option(help="Use k whole patients of the manifest (half positive), drawn with --draw; 0: all images.")] = 0,
    draw: Annotated[int, typer.Option(help="Seed of the patient draw (P5 learning curves use several).")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override the fixed schedule, e.g. --set train.epochs=8 (repeatable).")] = None,
    external: Annotated[Optional[list[Path]], typer.Option(help="Evaluate on this manifest too, e.g. the hospital's held-out patients (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Quick evaluation: every metric with its CI, no heat maps or t-SNE.")] = False,
) -> None:
    """Fine-tune a model on a few labelled patients of a new hospital (fixed schedule, source images replayed)."""
    from covidscan.config import QUICK_EVALUATION
    from covidscan.data.manifest import load_manifest
    from covidscan.finetune import finetune_run

    if patients < 0:
        raise CovidscanError(f"--patients must be 0 (all) or more, got {patients}")
    overrides = (QUICK_EVALUATION if quick else []) + list(set_ or [])
    metrics = finetune_run(run, load_manifest(labelled), out, labelled.stem, patients, draw, overrides,
                           _external_manifests(external or []), not quiet, _log)  # type: ignore[arg-type]
    _print_summary(metrics, out)
    console.print(DISCLAIMER, style="italic", markup=False)


@app.command("evaluate")
def evaluate_command(
    run: Annotated[Path, typer.Argument(help="Run folder from `covidscan train` or `make demo`.")],
    manifests: Annotated[Optional[list[Path]], typer.Argument(help="Manifests of external data sets (named after the file).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override evaluation settings, e.g. --set evaluate.cam_method=gradcam++.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Every metric with its CI, but no heat maps or t-SNE and 200 bootstrap resamples.")] = False,
) -> None:
    """Evaluate a trained model on its own test patients and on other data sets; rewrite its report.

    Every external set is stored in RUN/external/ and re-evaluated each time, so the report shows them all.
    """
    from covidscan.config import QUICK_EVALUATION, load_config
    from covidscan.evaluate.evaluation import evaluate_run

    if not (run / "config.yaml").is_file() or not (run / "metrics.json").is_file():
        raise CovidscanError(f"{run}: not a finished run folder (no config.yaml or metrics.json)")
    cfg = load_config(run / "config.yaml", (QUICK_EVALUATION if quick else []) + list(set_ or [])).evaluate
    metrics = evaluate_run(run, _external_manifests(manifests or []), cfg, not quiet, _log)  # type: ignore[arg-type]
    _print_summary(metrics, run)
    console.print(DISCLAIMER, style="italic", markup=False)


@app.command("compare")
def compare_command(
    run_a: Annotated[Path, typer.Argument(help="First run folder.")],
    run_b: Annotated[Path, typer.Argument(help="Second run folder.")],
    on: Annotated[str, typer.Option(help="Evaluation set both runs predicted: 'in-domain-test' or an external set's name.")] = "in-domain-test",
) -> None:
    """Compare two models on the same images: McNemar's test (decisions) and DeLong's test (AUC), patients as units."""
    import pandas as pd

    from covidscan.evaluate.evaluation import compare_predictions

    frames = []
    for run in (run_a, run_b):
        path = run / "predictions" / f"{on}.csv"
        if not path.is_file():
            raise CovidscanError(f"{path}: no predictions for {on!r}; run `covidscan evaluate {run}` (sets: "
                                 f"{', '.join(sorted(p.stem for p in (run / 'predictions').glob('*.csv'))) or 'none'})")
        frames.append(pd.read_csv(path, keep_default_na=False))
    columns = [c for c in frames[0].columns if c.startswith("p_")]
    if len(columns) != 1:
        raise CovidscanError(f"{run_a}: a model of {len(columns)} classes; `compare` tests two-class models (McNemar, DeLong on the positive class)")
    column = columns[0]
    rules = tuple(_study_rule_of(run) for run in (run_a, run_b))
    result = compare_predictions(frames[0], frames[1], column, rules)  # type: ignore[arg-type]
    m, d = result["mcnemar"], result["delong"]
    _log(f"{result['images']} images of {on}, {result['units']} as units:")
    _log(f"  McNemar ({m['method']}): only A right {m['only_a_correct']}, only B right {m['only_b_correct']}, p = {m['p_value']:.4g}")  # type: ignore[index]
    _log(f"  DeLong ({d['method']}): AUC A {d['auc_a']:.3f}, AUC B {d['auc_b']:.3f}, difference {d['difference']:+.3f}, p = {d['p_value']:.4g}")  # type: ignore[index]
    patient = result.get("patient_level")
    if isinstance(patient, dict):
        pm, pd_ = patient["mcnemar"], patient["delong"]
        _log(f"  {patient['patients']} patients, each model's study rule: McNemar ({pm['method']}) p = {pm['p_value']:.4g}; "
             f"DeLong AUC A {pd_['auc_a']:.3f}, B {pd_['auc_b']:.3f}, p = {pd_['p_value']:.4g}")


def _study_rule_of(run: Path) -> dict[str, object]:
    from covidscan.atomic import read_json_object

    card = read_json_object(run / "model.json") if (run / "model.json").is_file() else {}
    rule = card.get("study_rule")
    from covidscan.decision import DEFAULT_STUDY_RULE

    return rule if isinstance(rule, dict) else DEFAULT_STUDY_RULE


@app.command("cv")
def cv_command(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (with a 'fold' column, or folds are made as configured).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for one run per fold and cv.json.")],
    folds: Annotated[int, typer.Option(help="Number of folds when the manifest has none.")] = 5,
    config: Annotated[Optional[Path], typer.Option(help="YAML config.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. --set train.epochs=5 (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Skip the data audit made once before the folds.")] = False,
) -> None:
    """K-fold cross-validation over group folds; reports mean ± SD of the test metrics."""
    from covidscan.config import load_config
    from covidscan.data.manifest import load_manifest
    from covidscan.pipeline import CV_METRICS, cross_validate

    if out.exists() and any(out.iterdir()):
        raise CovidscanError(f"{out}: folder exists and is not empty; choose another --out")
    cfg = load_config(config, set_)
    if cfg.ensemble.members:
        raise CovidscanError("cv trains one network per fold; drop ensemble.members (cross-validate each backbone, then combine with `covidscan ensemble`)")
    summary = cross_validate(load_manifest(manifest), cfg, out, folds, not quiet, _log, audit=not no_audit)
    shown = ", ".join(f"{k} {summary[k]['mean']:.3f} ± {summary[k]['sd']:.3f}" for k in CV_METRICS)  # type: ignore[index]
    _log(f"{summary['folds']}-fold CV (mean ± SD over folds): {shown}\n-> {out / 'cv.json'}")


def _print_summary(metrics: dict[str, object], run_dir: Path) -> None:
    """Study-level and external results with 95 % CIs, as deployed (gate, calibration, study rule)."""
    from covidscan.evaluate.evaluation import set_summary

    evaluation = metrics.get("evaluation") or {}
    assert isinstance(evaluation, dict)
    for name, result in (evaluation.get("sets") or {}).items():
        _log(set_summary(name, result))
        warning = (result.get("patient_level") or {}).get("warning")
        if warning:
            _log(f"  note: {warning}")
    _log(f"report: {run_dir / 'report.html'}   metrics: {run_dir / 'metrics.json'}")


@app.command("predict")
def predict_command(
    model: Annotated[Path, typer.Argument(help="Run folder (or its model.json), or an exported bundle; the input gate applies to both.")],
    images: Annotated[list[Path], typer.Argument(help="PNG, JPEG, BMP, TIFF, DICOM (any name) or NIfTI files (every slice; "
                                                     "--slice picks one); or one study: a folder of DICOM files or a zip of one.")],
    study: Annotated[bool, typer.Option("--study", help="The images are slices of one study: also print the study answer (the model card's rule).")] = False,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="NIfTI volumes and multi-frame DICOM: only this slice (from 0).")] = None,
) -> None:
    """Print class probabilities and the predicted label for each image or slice (and for the study with --study).

    A folder or zip is one study: its DICOM series is chosen and ordered as the service does (scouts skipped, the
    series with the most slices, ordered by position), and the study answer is printed."""
    from covidscan.data.study import iter_study_images, plan_files, read_study_input
    from covidscan.predict import load_scorer
    from covidscan.serve.predictor import is_bundle

    scorer = _BundleScorer(model) if is_bundle(model) else load_scorer(model)  # a broken model card is the first error
    names: list[str] = []
    pixels: list[np.ndarray] = []
    for path in images:
        if path.is_dir() or path.suffix.lower() == ".zip":
            files = read_study_input(path)
            plan = plan_files(files.items())
            skipped = list(plan.skipped)
            for source, image in iter_study_images(plan, files, skipped):
                names.append(f"{path}/{source}")
                pixels.append(image.pixels)
            _log(f"{path}: {plan.describe()}" + "".join(f"\n  skipped {s}: {r}" for s, r in skipped))
            study = True
        else:
            frames = _image_slices(path, slice_index)
            names += [name for name, _ in frames]
            pixels += [p for _, p in frames]
    predictions = scorer.predict_pixels(names, pixels)
    for prediction in predictions:
        # a refused slice has no estimate: its probabilities are not printed
        probs = "  ".join(f"P({name})={value:.3f}" for name, value in prediction.probabilities.items()) if prediction.in_distribution else ""
        verdict = prediction.label if prediction.in_distribution else "refused (unlike the training data; no prediction)"
        gate = f"  gate distance {prediction.gate_distance:.2f} (limit {scorer.gate_threshold:.2f})" if scorer.has_gate else ""
        _log(f"{prediction.path}: {verdict}  {probs}{gate}")
    if study:
        _study_line(scorer.study(predictions), scorer.study_rule)
    if scorer.validated:
        _log(f"validated: {scorer.validated}")
    console.print(DISCLAIMER, style="italic", markup=False)


def _image_slices(path: Path, slice_index: int | None) -> list[tuple[str, np.ndarray]]:
    """(name, pixels) of one file: every slice of a volume or multi-frame DICOM unless --slice picks one."""
    from covidscan.data.io import is_dicom_file, is_volume_file, nifti_slice_count, read_image

    if slice_index is not None or not (is_volume_file(path) or is_dicom_file(path)):
        return [(str(path) + (f" [slice {slice_index}]" if slice_index is not None else ""), read_image(path, slice_index).pixels)]
    if is_volume_file(path):
        count = nifti_slice_count(path)
        return [(f"{path} [slice {i}]", read_image(path, i).pixels) for i in range(count)]
    from covidscan.data.io import MAX_PIXELS, iter_image_bytes

    frames = [image.pixels for image in iter_image_bytes(path.read_bytes(), str(path), max_pixels=MAX_PIXELS)]
    return [(str(path) + (f" [frame {i}]" if len(frames) > 1 else ""), p) for i, p in enumerate(frames)]


def _study_line(answer: StudyAnswer, rule: dict[str, object]) -> None:
    from covidscan.decision import rule_name

    if not answer.used:
        _log(f"study: refused, all {answer.total} slices are unlike the training data")
        return
    if not answer.answered:
        _log(f"study: {answer.label} with this model ({answer.used} of {answer.total} slices accepted): {answer.reason}")
        return
    _log(f"study: {answer.label}  P = {answer.probability:.3f} ({rule_name(rule)}, threshold {float(rule.get('threshold', 0.5)):.3f}; "  # type: ignore[arg-type]
         f"{answer.used} slices used, {answer.refused} refused)")


class _BundleScorer:
    """An exported bundle behind the scorer interface `predict` uses (ONNX Runtime, the gate as the service applies it)."""

    has_gate = True

    def __init__(self, folder: Path) -> None:
        from covidscan.serve.predictor import load_bundle

        self.bundle = load_bundle(folder)
        self.gate_threshold, self.study_rule, self.study = self.bundle.gate_threshold, self.bundle.study_rule, self.bundle.study
        self.validated = self.bundle.validated

    def predict_pixels(self, names: list[str], pixels: list[np.ndarray]) -> list[Any]:
        from covidscan.predict import Prediction

        results = self.bundle.analyse(pixels, heatmaps=False)
        return [Prediction(name, r.label, r.probabilities, self.bundle.threshold, r.in_distribution, r.gate_distance, lung=r.lung)
                for name, r in zip(names, results)]


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="Run folder from `covidscan train` or `make demo`.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Bundle folder to write (default RUN/bundle).")] = None,
    format_: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Serve a statically quantised int8 graph, if its held-out decisions match fp32.")] = False,
) -> None:
    """Export a run to an ONNX bundle (model.onnx, model.json, gate.npz) and check parity with PyTorch."""
    from covidscan.export.onnx import export_run

    if format_ != "onnx":
        raise CovidscanError(f"unknown export format {format_!r}; only 'onnx' is supported")
    if not (run / "model.json").is_file():
        raise CovidscanError(f"{run}: not a run folder (no model.json)")
    bundle = out or run / "bundle"
    card = export_run(run, bundle, int8=int8)
    if int8:
        check = card["int8_check"]
        assert isinstance(check, dict)
        _log(f"int8: decisions agree with fp32 on {check['label_agreement']:.1%} of {check['images']} held-out images, "
             f"max |Δp| {check['max_abs_probability_diff']:.3f}" + (f", AUC {check['auc_fp32']:.3f} -> {check['auc_int8']:.3f}" if "auc_int8" in check else ""))
    parity = card["parity"]
    assert isinstance(parity, dict)
    shown = "; ".join(f"{k}: max |Δp| {v['max_abs_probability_diff']:.1e}"
                      + (f", max |Δlogit| {v['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in v else "") + f" on {v['images']} images"
                      for k, v in parity.items() if "max_abs_probability_diff" in v)
    if "gate" in parity:
        shown += f"; gate: max |Δdistance| {parity['gate']['max_abs_distance_diff']:.1e} on {parity['gate']['images']} images"
    what = "model.json and one bundle per member under members/" if card.get("kind") == "ensemble" else "model.onnx, model.json, gate.npz"
    _log(f"wrote {bundle}: {what} (parity with PyTorch: {shown})")
    _log(f"serve it:  covidscan serve {bundle}")


@app.command("serve")
def serve_command(
    bundles: Annotated[list[Path], typer.Argument(help="Bundle folders from `covidscan export` (or run folders with a bundle/ inside); "
                                                       "several: one per modality (a CT and a chest X-ray model), each upload routed to one.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body accepted (413 above); 400 MB takes a 300-slice study.")] = DEFAULT_MAX_UPLOAD_MB,
    api_key: Annotated[Optional[str], typer.Option(help="Require this X-API-Key header (or set COVIDSCAN_API_KEY).")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="Allow this browser origin (repeatable); CORS is off by default.")] = None,
    concurrency: Annotated[int, typer.Option(help="Uploads decoded and analysed at once (memory bound = this x the per-request bound).")] = 2,
    read_timeout: Annotated[float, typer.Option(help="Seconds a request body may stall before the server answers 408.")] = 30.0,
    max_connections: Annotated[int, typer.Option(help="Open connections before the server answers 503.")] = 16,
) -> None:
    """Serve the web page and REST API for exported models (ONNX Runtime; no torch)."""
    from covidscan.serve.__main__ import run_server

    from covidscan.serve.predictor import is_bundle

    folders = [str(b / "bundle") if is_bundle(b / "bundle") else str(b) for b in bundles]
    _log(f"covidscan service on http://{host}:{port}/  (API docs: /docs)  {DISCLAIMER}")
    run_server(folders, host, port, max_upload_mb, api_key, cors_origin, 0, concurrency, read_timeout, max_connections)


@app.command("dicom-listen")
def dicom_listen_command(
    bundles: Annotated[list[Path], typer.Argument(help="Exported bundle folders (`covidscan export RUN`); several: one per modality.")],
    send_to: Annotated[str, typer.Option("--send-to", help="Where answers go: HOST:PORT:AE_TITLE of the PACS or viewer.")],
    port: Annotated[int, typer.Option(help="Port to listen on (DICOM's registered port is 104; 11112 needs no privileges).")] = 11112,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface; give the PACS's network).")] = "127.0.0.1",
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title (associations called for another are rejected).")] = "COVIDSCAN",
    allow_caller: Annotated[Optional[list[str]], typer.Option("--allow-caller", help="Accept associations only from this calling AE title (repeatable; default: any).")] = None,
    retry_seconds: Annotated[float, typer.Option(help="First wait before an undelivered answer is sent again (doubling each time).")] = 60.0,
    delivery_attempts: Annotated[int, typer.Option(help="Deliveries tried before an answer moves to the spool's dead-letter folder.")] = 8,
    tls_cert: Annotated[Optional[Path], typer.Option(help="TLS: this node's certificate (PEM); incoming associations then need TLS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="TLS: the certificate's private key (PEM).")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(help="TLS: require a peer certificate signed by this CA (PEM).")] = None,
    tls_destination_ca: Annotated[Optional[Path], typer.Option(help="TLS: send the answers over TLS, checking the destination against this CA.")] = None,
    idle_seconds: Annotated[float, typer.Option(help="A study is complete when no instance of it arrived for this long.")] = 10.0,
    spool: Annotated[Optional[Path], typer.Option(help="Folder for received instances until answered (kept over a restart); "
                                                       "default ~/.cache/covidscan/dicom-spool.")] = None,
    spool_gb: Annotated[float, typer.Option(help="Bytes of instances waiting in the spool before senders get 0xA700 (GB).")] = 4.0,
    max_associations: Annotated[int, typer.Option(help="Associations at once, all peers together.")] = 16,
    per_peer: Annotated[int, typer.Option(help="Associations at once from one IP address (more are disconnected).")] = 4,
    connect_timeout: Annotated[float, typer.Option(help="Seconds a connection may take to finish association negotiation (ARTIM).")] = 10.0,
    idle_timeout: Annotated[float, typer.Option(help="Seconds an association, or a partly sent PDU, may stay silent.")] = 30.0,
) -> None:
    """Receive CT studies from a PACS (storage SCP), analyse each when complete, and send back a DICOM SR and a
    Secondary Capture with the heat map. Decision support only. No patient field is logged."""
    import logging
    import signal
    import threading

    from covidscan.serve.dicom_node import Destination, DicomListener, NodeLimits, TlsSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    limits = NodeLimits(max_associations, per_peer, connect_timeout, idle_timeout, spool_bytes=int(spool_gb * 1e9))
    listener = DicomListener([str(b) for b in bundles], Destination.parse(send_to), port, host, ae_title, idle_seconds,
                             spool_dir=spool, limits=limits, allowed_callers=tuple(allow_caller or ()), retry_s=retry_seconds,
                             attempts=delivery_attempts, tls=TlsSettings(tls_cert, tls_key, tls_client_ca, tls_destination_ca))
    listener.start()
    _log(f"{ae_title} listening on {host}:{listener.port}; answers to {send_to}. Ctrl-C stops. {DISCLAIMER}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    listener.stop()


@app.command("models")
def models_command() -> None:
    """List the registered backbones, their input sizes and where their weights come from."""
    from covidscan.models.registry import list_backbones

    for spec in list_backbones():
        _log(f"{spec.name}  {spec.input_size} px  CAM layer '{spec.cam_layer}'  {spec.notes}")
        _log(f"    offline: {spec.offline_weights}")
        for source in spec.weight_sources:
            _log(f"    weights: {source}")
    _log("Any other timm model name works too, with --set model.weights=FILE (a local weights file) or --set model.weights=hub (online).")
    _log("Ensembles: configs/seed-stacking.yaml (VGG16 + InceptionV3 + DenseNet201; hub weights online, random offline) and "
         "configs/lite-stacking.yaml (EfficientNet-Lite0/1/2; packaged ImageNet weights, offline). Each member's source is in its model card.")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = Path("runs/demo"),
    data: Annotated[Path, typer.Option(help="Where the synthetic data set is generated.")] = Path("runs/demo-data"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override the demo config, e.g. --set train.epochs=2.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Run the whole pipeline on the synthetic phantom data set: data, split, train, evaluate, report."""
    from covidscan.config import load_config, packaged_config
    from covidscan.data.manifest import save_manifest
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset
    from covidscan.data.sources import index_folder
    from covidscan.pipeline import publish_run_dir, train_run

    started = time.perf_counter()
    spec = PhantomSpec()
    stamp = data / ".complete"
    if not stamp.is_file() or stamp.read_text() != repr(spec):
        _log(f"generating {2 * spec.patients_per_class * spec.slices_per_patient} synthetic CT slices -> {data}")
        generate_phantom_dataset(data, spec)
        stamp.write_text(repr(spec))
    frame = index_folder(data, "binary", source="phantom")
    other = data.with_name(f"{data.name}-hospital-b")
    other_spec = PhantomSpec(patients_per_class=12, slices_per_patient=4, seed=1, scanner="B")
    other_stamp = other / ".complete"
    if not other_stamp.is_file() or other_stamp.read_text() != repr(other_spec):
        _log(f"generating an external test set from another synthetic scanner -> {other}")
        generate_phantom_dataset(other, other_spec)
        other_stamp.write_text(repr(other_spec))
    externals = {"hospital-b": index_folder(other, "binary", source="phantom-hospital-b")}
    cfg = load_config(packaged_config("demo"), set_)
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    save_manifest(frame, staging / "manifest-unsplit.csv")
    metrics = train_run(frame, cfg, staging, show_progress=not quiet, log=_log, externals=externals)  # type: ignore[arg-type]
    from covidscan.export.onnx import export_run

    card = export_run(staging, staging / "bundle")
    publish_run_dir(staging, out)
    _print_summary(metrics, out)
    parity = card["parity"]["real"]  # type: ignore[index]
    _log(f"exported {out / 'bundle'} (ONNX; max |Δp| vs PyTorch {parity['max_abs_probability_diff']:.1e})")
    _log(f"demo finished in {time.perf_counter() - started:.0f} s")
    _log(f"try a prediction:  covidscan predict {out} {sorted(data.glob('COVID/*/*.png'))[0]}")
    _log(f"serve the demo model (web page + REST API):  .venv/bin/covidscan serve {out / 'bundle'}   then open http://127.0.0.1:8000/")
    console.print(DISCLAIMER, style="italic", markup=False)


def main() -> None:
    """Entry point: user errors print one line and exit 2; no traceback."""
    try:
        app()
    except CovidscanError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
