"""One training run end to end: manifest in, run folder out.

Run folder: config.yaml, manifest.csv (with split), model.json,
checkpoints/{last,best}.safetensors, history.jsonl, metrics.json, report.html.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidscan import DISCLAIMER, __version__, atomic
from covidscan.config import RunConfig, save_config
from covidscan.data.audit import AuditFindings
from covidscan.data.io import load_image_array
from covidscan.data.manifest import class_names, image_refs, part_counts, save_manifest
from covidscan.data.summary import audit_training_data, data_summary, training_audit, training_modality
from covidscan.data.split import leakage_report, leakage_threshold, split_manifest
from covidscan.data.transforms import Normaliser
from covidscan.errors import ConfigError, DataError
from covidscan.decision import DECISION_SETTINGS, rule_name
from covidscan.evaluate.evaluation import evaluate_run, fit_decision
from covidscan.model_card import NETWORK, LabelSpace, ModelCard, read_model_card
from covidscan.models.classifier import CovidClassifier
from covidscan.models.decompose import decompose_classes, parse_decompose
from covidscan.models.embed import embed_array, manifest_embeddings
from covidscan.predict import MODEL_CARD
from covidscan.models.registry import get_backbone
from covidscan.seed import seed_everything
from covidscan.train.distributed import device_for, init_distributed
from covidscan.train.engine import TensorData, fit, source_weights



def ordered_classes(frame: pd.DataFrame, positive: str) -> list[str]:
    """Class order of the model's outputs: for two classes the positive one is last (index 1)."""
    classes = class_names(frame)
    if len(classes) == 2:
        if positive not in classes:
            # Never fall back to the sorted order: the wrong positive class silently inverts every metric.
            close = [c for c in classes if c.lower() == positive.lower()]
            hint = f"; did you mean {close[0]!r}? (class names are case-sensitive)" if close else ""
            raise ConfigError(f"data.positive_class={positive!r} is not one of the classes {classes}{hint}")
        classes = [c for c in classes if c != positive] + [positive]
    return classes


def assign_splits(
    frame: pd.DataFrame, config: RunConfig, where: str, show: bool = True, cache: Path | None = None
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Keep an existing split column, else split as configured; measure the leakage figure either way."""
    embeddings = manifest_embeddings(frame, cache, show=show)
    if "split" in frame.columns and set(frame["split"].astype(str)) >= {"train", "val", "test"}:
        split = frame["split"].astype(str).to_numpy()
        train = np.flatnonzero(split == "train")
        threshold = leakage_threshold(frame, embeddings)
        report: dict[str, object] = {
            "by": "given in the manifest", "seed": "", "warning": "",
            "leakage_test": leakage_report(embeddings, np.flatnonzero(split == "test"), train, threshold),
        }
        report["flagged"] = report["leakage_test"]["flagged"]  # type: ignore[index]
        return frame, report
    s = config.split
    return split_manifest(frame, s.by, embeddings, s.test_size, s.val_size, s.seed, where=where)


def train_run(
    frame: pd.DataFrame,
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    split_report: dict[str, object] | None = None,
    externals: dict[str, pd.DataFrame] | None = None,
    provenance: dict[str, object] | None = None,
    audit: AuditFindings | bool = True,
) -> dict[str, object]:
    """Audit, split (if needed), train, evaluate on the held-out test patients (and external sets), write the run folder.

    `split_report` (from `split_manifest`) skips re-measuring a split made just before. `provenance` (e.g. how
    `covidscan finetune` drew its local patients) is recorded in model.json and metrics.json. `audit`: run the data
    audit (True), skip it (False, stated in the report), or the findings of an audit made once for several runs.
    """
    run_dir = Path(run_dir)
    started = time.perf_counter()
    ctx = init_distributed()  # one process unless launched by torchrun
    if not ctx.is_main:
        show_progress, log = False, (lambda message: None)
    seed_everything(config.train.seed, config.train.deterministic)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if split_report is None:
        frame, split_report = assign_splits(frame, config, str(run_dir / "manifest.csv"), show_progress, run_dir / "embeddings.npz")
    leak = split_report["leakage_test"]
    assert isinstance(leak, dict)
    log(f"split by {split_report['by']}: leakage figure {leak['near_duplicates']}/{leak['test_images']} test images "
        f"({leak['share']:.1%}) with a near duplicate in train" + ("  LEAKY SPLIT" if leak["flagged"] else ""))
    classes = ordered_classes(frame, config.data.positive_class)
    if len(classes) < 2:
        raise DataError(run_dir, f"need at least two classes, found {classes}")
    spec = get_backbone(config.model.backbone)
    size = config.data.image_size or spec.input_size
    run_dir.mkdir(parents=True, exist_ok=True)
    audit_json: dict[str, object] = {}
    if ctx.is_main:
        save_config(config, run_dir / "config.yaml")
        save_manifest(frame, run_dir / "manifest.csv")
        audit_json = training_audit(frame, audit, run_dir, show_progress, log)

    parts: dict[str, TensorData] = {}
    for split in ("train", "val", "test"):
        rows = frame[frame["split"] == split]
        if rows.empty or rows["label"].nunique() < (2 if split != "test" else 1):
            raise DataError(run_dir / "manifest.csv", f"split {split!r} has {len(rows)} images of {rows['label'].nunique()} class(es); too few patients to train and test")
        images = load_image_array(image_refs(rows), size, f"loading {split} images", show_progress, config.data.preprocess)
        labels = np.array([classes.index(label) for label in rows["label"]], np.int64)
        parts[split] = TensorData(torch.from_numpy(images), torch.from_numpy(labels))
    if config.train.balance_sources:
        parts["train"] = balanced_by_source(parts["train"], frame[frame["split"] == "train"], log)
    counts = part_counts(frame)
    log(
        "images: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items())
        + " | patients or groups: " + ", ".join(f"{k} {counts[k]['patients_or_groups']}" for k in parts)
    )

    device = device_for(ctx, config.train.device)
    normaliser = Normaliser.for_backbone(spec)
    labels, decomposition = LabelSpace.identity(classes), None
    wanted = parse_decompose(config.model.decompose, classes)
    if wanted:  # DeTraC: sub-classes from the pretrained backbone's features of the training images
        probe = CovidClassifier(config.model.backbone, len(classes), 1, config.model.dropout, config.model.weights)
        features = embed_array(probe, parts["train"].images.numpy(), normaliser, show=show_progress)
        decomposition = decompose_classes(features, parts["train"].labels.numpy(), classes, wanted, config.train.seed)
        labels = decomposition.labels
        parts["train"] = TensorData(parts["train"].images, torch.from_numpy(decomposition.output_labels), parts["train"].draw_weights)
        if ctx.is_main:  # the assignment itself, for review (image paths only, no patient IDs)
            rows = frame.loc[frame["split"] == "train", [c for c in ("path", "slice_index", "label") if c in frame.columns]].copy()
            rows["sub_class"] = [labels.outputs[i] for i in decomposition.output_labels]
            atomic.write_with(run_dir / "decomposition.csv", lambda tmp: rows.to_csv(tmp, index=False))
            decomposition.report["assignment"] = "decomposition.csv"
        log("decomposed classes: " + ", ".join(f"{c} -> {v['sub_classes']} ({'/'.join(map(str, v['sizes']))} images)"  # type: ignore[index]
                                              for c, v in decomposition.report["per_class"].items()))  # type: ignore[union-attr]
    model = CovidClassifier(config.model.backbone, len(labels.outputs), 1, config.model.dropout, config.model.weights, parents=labels.parents)
    if config.model.init_from:
        start_from_run(model, Path(config.model.init_from), classes, size, config)
    model = model.to(device)
    log(f"model: {spec.name} ({model.weights_source}), {size} px, transfer '{config.model.transfer}', device {device}")
    positive = len(classes) - 1
    result = fit(
        model, parts["train"].to(device), parts["val"].to(device), config.train, config.model.transfer,
        normaliser, run_dir, positive=positive, resume=resume, log=log, ctx=ctx,
    )
    if not result["ranks_agree"]:
        raise RuntimeError("DDP ranks ended with different weights")

    metrics: dict[str, object] = {
        "covidscan_version": __version__,
        "decision_support": DISCLAIMER,
        "classes": classes,
        "positive_class": classes[positive],
        "split": {
            "by": split_report["by"], "seed": split_report["seed"], "warning": split_report["warning"],
            "counts": {k: len(v) for k, v in parts.items()},
            "groups": {k: counts[k]["patients_or_groups"] for k in parts},
            "leakage_test": split_report["leakage_test"],
        },
        "data": data_summary(frame, audit_json),
        "training": {k: v for k, v in result.items() if k != "history"},
    }
    if decomposition is not None:
        metrics["training"]["decomposition"] = decomposition.report  # type: ignore[index]
    metrics["training"].update(provenance or {})  # type: ignore[union-attr]
    card: dict[str, object] = {
        "backbone": spec.name,
        "classes": classes,
        "positive_class": classes[positive],
        "image_size": size,
        "preprocess": config.data.preprocess,
        "in_chans": 1,
        "dropout": config.model.dropout,
        "normalise": {"mean": normaliser.mean, "std": normaliser.std},
        "threshold": 0.5,
        "weights": "checkpoints/best.safetensors",
        "pretrained_from": model.weights_source,
        "training_data": metrics["data"],
        "covidscan_version": __version__,
        "intended_use": DISCLAIMER,
    }
    card.update(provenance or {})
    if labels.is_decomposed:
        card["labels"] = labels.to_json()
        card["decomposition"] = decomposition.report  # type: ignore[union-attr]
    if not ctx.is_main:
        return metrics
    card.update(deployed_decision(run_dir, ModelCard.from_json(card), frame, parts, classes, config, log))
    atomic.write_json(run_dir / MODEL_CARD, card)
    return evaluate_run(run_dir, externals, config.evaluate, show_progress, log, metrics=metrics, started=started)


def balanced_by_source(train: TensorData, rows: pd.DataFrame, log: Callable[[str], None]) -> TensorData:
    """The training part drawn so that every source (manifest column 'source') fills an equal share of an epoch."""
    sources = rows["source"].astype(str).to_numpy() if "source" in rows.columns else np.full(len(rows), "")
    counts = pd.Series(sources).value_counts()
    if len(counts) < 2:
        log("source-balanced sampling: only one source in the training part; nothing to balance")
        return train
    log("source-balanced sampling: " + ", ".join(f"{k} {v} images" for k, v in counts.items()) + " drawn equally often")
    return TensorData(train.images, train.labels, source_weights(sources))


def start_from_run(model: CovidClassifier, source: Path, classes: list[str], size: int, config: RunConfig) -> None:
    """Load a trained run's kept weights into `model`, after checking that the two describe the same network."""
    from covidscan.train.checkpoint import load_checkpoint

    card = read_model_card(source / MODEL_CARD, f"model.init_from={str(source)!r}: not a trained run folder (no {MODEL_CARD})")
    wanted = {"backbone": config.model.backbone, "classes": classes, "image size": size, "preprocessing": config.data.preprocess,
              "outputs": list(classes) if config.model.decompose == "off" else "decomposed"}
    found = {"backbone": card.raw.get("backbone"), "classes": list(card.classes), "image size": card.size, "preprocessing": card.preprocess,
             "outputs": list(card.labels.outputs) if not card.labels.is_decomposed else "decomposed"}
    differing = [f"{k} {found[k]!r} (this run: {wanted[k]!r})" for k in wanted if found[k] != wanted[k]]
    if card.kind != NETWORK or differing:
        raise ConfigError(f"model.init_from={str(source)!r} cannot start this run: " + ("it is an ensemble" if card.kind != NETWORK else "; ".join(differing)))
    load_checkpoint(source / str(card.raw.get("weights") or "checkpoints/best.safetensors"), model)
    model.weights_source = f"run {source.name} (fine-tuned from its kept weights)"


def deployed_decision(
    run_dir: Path, card: ModelCard, frame: pd.DataFrame, parts: dict[str, TensorData], classes: list[str], config: RunConfig,
    log: Callable[[str], None],
) -> dict[str, object]:
    """Input gate, calibration, operating points and study rule of the best model, from train/validation only."""
    from covidscan.evaluate.evaluation import fit_evidence, fit_run_gate, gate_sample
    from covidscan.gate import gate_distance, save_gate
    from covidscan.predict import Predictor

    predictor = Predictor(run_dir, card)  # the best checkpoint, on the CPU, as evaluation and export load it; card in memory
    val_images, train_images = parts["val"].images.cpu().numpy(), parts["train"].images.cpu().numpy()
    val_probs, val_stats = predictor.score(val_images, tta=config.evaluate.tta)  # one pass: probabilities and gate statistics
    train_stats = predictor.score(train_images[gate_sample(len(train_images))], tta=False)[1]
    gate_arrays, gate_card = fit_run_gate(train_stats, val_stats[gate_sample(len(val_stats))])
    save_gate(gate_arrays, run_dir / "gate.npz")
    val_frame = frame[frame["split"] == "val"].reset_index(drop=True)
    decision = fit_decision(val_frame, val_probs, classes, config.evaluate)
    accepted = gate_distance(gate_arrays, val_stats) <= float(gate_card["threshold"])  # type: ignore[arg-type]
    evidence = fit_evidence(val_frame, accepted, val_images)
    calibration, rule = decision["calibration"], decision["study_rule"]
    assert isinstance(calibration, dict) and isinstance(rule, dict)
    log(f"deployed decision: {calibration['reason']}; study rule {rule_name(rule)}, threshold {float(rule['threshold']):.3f} "
        f"({rule['chosen_on']}); input gate refuses distances above {float(gate_card['threshold']):.1f}; "  # type: ignore[arg-type]
        f"a study is {evidence.describe()} ({evidence.chosen_on})")
    return {**decision, "gate": gate_card, "evidence_rule": evidence.to_json()}


def publish_run_dir(staging: Path, final: Path) -> Path:
    """Swap a finished staging folder into place; the old run is removed only after the swap."""
    atomic.swap_folder(staging, final)
    return final


CV_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def cross_validate(
    frame: pd.DataFrame,
    config: RunConfig,
    run_dir: str | Path,
    folds: int = 5,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    audit: bool = True,
) -> dict[str, object]:
    """K-fold CV over group folds: fold k is the test part, fold k+1 the validation part.

    Folds come from the manifest's `fold` column, or are made with the
    configured split method. Returns (and writes cv.json with) mean ± SD.
    """
    run_dir = Path(run_dir)
    embeddings = manifest_embeddings(frame, run_dir / "embeddings.npz", show=show_progress)
    if "fold" not in frame.columns or (frame["fold"].astype(str) == "").any():
        s = config.split
        frame, _ = split_manifest(frame, s.by, embeddings, seed=s.seed, folds=folds, where=str(run_dir))
    fold = frame["fold"].astype(int).to_numpy()
    threshold = leakage_threshold(frame, embeddings)
    k_folds = int(fold.max()) + 1
    findings: AuditFindings | bool = audit_training_data(frame, run_dir, show_progress, log) if audit else False
    per_fold = []
    for k in range(k_folds):
        part = frame.copy()
        part["split"] = np.where(fold == k, "test", np.where(fold == (k + 1) % k_folds, "val", "train"))
        split = part["split"].to_numpy()
        report: dict[str, object] = {
            "by": f"{config.split.by} folds ({k_folds})", "seed": config.split.seed, "warning": "",
            "leakage_test": leakage_report(embeddings, np.flatnonzero(split == "test"), np.flatnonzero(split == "train"), threshold),
        }
        log(f"--- fold {k + 1}/{k_folds} ---")
        metrics = train_run(part, config, run_dir / f"fold-{k}", show_progress=show_progress, log=log, split_report=report, audit=findings)
        refused = metrics["evaluation"]["sets"]["in-domain test"]["gate"]["refused"]  # type: ignore[index]
        per_fold.append({**metrics["test"], "refused_by_gate": refused})  # type: ignore[dict-item]
    summary: dict[str, object] = {"folds": k_folds, "per_fold": per_fold}
    for name in CV_METRICS:
        values = np.array([float(m[name]) for m in per_fold if name in m])  # type: ignore[index]
        summary[name] = {"mean": float(np.nanmean(values)), "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else float("nan")}
    atomic.write_json(run_dir / "cv.json", summary)
    return summary


def train_ensemble(
    frame: pd.DataFrame,
    config: RunConfig,
    run_dir: str | Path,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    externals: dict[str, pd.DataFrame] | None = None,
    audit: bool = True,
) -> dict[str, object]:
    """`ensemble.members` in one command: split once, train each backbone into RUN/members/<backbone>, combine.

    Members are evaluated quickly on the test part (their own figures stay in
    their folders); the ensemble gets the full evaluation, external sets included.
    """
    import copy

    from covidscan.config import QUICK_EVALUATION, load_config
    from covidscan.ensemble import build_ensemble

    run_dir = Path(run_dir)
    backbones = [b.strip() for b in config.ensemble.members.split(",") if b.strip()]
    if len(backbones) < 2 or len(set(backbones)) < len(backbones):
        raise ConfigError(f"ensemble.members needs at least two different backbones, got {backbones}")
    for backbone in backbones:
        get_backbone(backbone)  # unknown names fail before any training
    run_dir.mkdir(parents=True, exist_ok=True)
    frame, split_report = assign_splits(frame, config, str(run_dir / "manifest.csv"), show_progress, run_dir / "embeddings.npz")
    save_config(config, run_dir / "config.yaml")  # `covidscan train --resume RUN` continues from here
    save_manifest(frame, run_dir / "manifest.csv")
    quick = load_config(None, QUICK_EVALUATION).evaluate
    findings: AuditFindings | bool = audit_training_data(frame, run_dir, show_progress, log) if audit else False
    members = []
    for backbone in backbones:
        member_config = copy.deepcopy(config)
        member_config.model.backbone, member_config.ensemble.members = backbone, ""
        member_config.evaluate = copy.deepcopy(quick)
        for name in DECISION_SETTINGS + ("prevalence",):
            setattr(member_config.evaluate, name, getattr(config.evaluate, name))
        log(f"--- member {backbone} ---")
        member_dir = run_dir / "members" / backbone
        if not (member_dir / "metrics.json").is_file():  # a member finished before an interruption is kept
            resume = (member_dir / "checkpoints" / "last.safetensors").is_file()  # an interrupted one continues exactly
            train_run(frame, member_config, member_dir, resume=resume, show_progress=show_progress, log=log, split_report=split_report, audit=findings)
        members.append(member_dir)
    log(f"--- ensemble ({config.ensemble.method}) ---")
    return build_ensemble(members, run_dir, config.ensemble.method, config.evaluate, show_progress, log, externals)
