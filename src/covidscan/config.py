"""Typed run configuration: defaults, then a YAML file, then `section.key=value` overrides.

Unknown keys are errors (with a "did you mean"), so a typo never silently
falls back to a default. The resolved config is saved in every run folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from covidscan.combine import METHODS as ENSEMBLE_METHODS
from covidscan.errors import ConfigError


@dataclass
class DataConfig:
    image_size: int = 0  # 0: the backbone's registered input size
    labels: str = "binary"  # 'binary', 'auto' (folder names) or 'A,B,C'
    positive_class: str = "COVID"
    preprocess: str = "none"  # none | lung_crop | clahe | lung_crop+clahe | histeq | lung_zscore (data/preprocess.py; the same at serving time)


@dataclass
class SplitConfig:
    by: str = "patient"  # patient | cluster (image-similarity groups, when patient IDs are missing) | auto (patient if every image has one) | random
    test_size: float = 0.2
    val_size: float = 0.2  # share of the whole data set
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    dropout: float = 0.25
    transfer: str = "fine"  # shallow | deep | fine
    # DeTraC class decomposition: off | auto (k per class by silhouette over 2-4) | K | CLASS=K,CLASS=K
    decompose: str = "off"
    # A run folder whose kept weights this network starts from (same backbone, classes, size and preprocessing):
    # local fine-tuning of a trained model (`covidscan finetune`). Empty: start from `weights`.
    init_from: str = ""


@dataclass
class EnsembleConfig:
    """`covidscan train` with members trains each backbone on one shared split, then combines them."""

    members: str = ""  # comma-separated backbones (a YAML list works too); empty: one network
    method: str = "stacking"  # soft | weighted | stacking (fitted on validation predictions only)


@dataclass
class TrainConfig:
    """Defaults follow the seed study: batch 64, Adam, cross-entropy, rotation augmentation."""

    epochs: int = 20
    head_epochs: int = 2  # 'fine' transfer: epochs with the backbone frozen
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # 'fine' transfer: top backbone group's learning rate = lr * this
    unfreeze_epochs: int = 3  # 'fine' transfer: epochs over which backbone groups unfreeze, deepest first
    layer_decay: float = 0.8  # 'fine' transfer: each group nearer the input gets this times the lr above it
    weight_decay: float = 0.0
    patience: int = 5  # early stopping: epochs without a better selection score
    # Which epoch is kept: 'loss' (validation log loss), 'auc' (validation AUC, ties broken by loss; two classes
    # only) or 'last' (no selection: the final epoch, for fixed schedules such as few-shot `covidscan finetune`).
    select: str = "loss"
    augment: bool = True
    rotation_deg: float = 10.0
    zoom: float = 0.1  # random zoom in [1 - zoom, 1 + zoom]
    shift: float = 0.05  # random shift, as a fraction of the image size
    # Small-data regularisers (issue 14, P2): mixup's Beta(alpha, alpha) (0: off) and label smoothing of the targets.
    mixup: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"  # learning rate over the epochs: constant | cosine (to 0 at train.epochs)
    class_balanced: bool = False
    # Every source (manifest column 'source') is drawn equally often per epoch: multi-source training where one
    # hospital has far more images than another (sampling with replacement; an epoch keeps its length).
    balance_sources: bool = False
    # Augmentation that imitates other image sources (figures cut from papers, other scanners): resolution loss,
    # JPEG artefacts, window/level shifts, figure borders, arrows and letters, blur, noise; each with this probability.
    source_augment: float = 0.0
    device: str = "auto"
    seed: int = 0
    deterministic: bool = True
    threads: int = 0  # 0: torch's default
    channels_last: bool = True  # NHWC memory layout: faster on CPU and GPU (bench/train_cpu.py)
    # bf16 autocast of the CPU training step: with channels-last 1.5-2.0x faster than fp32 for vgg16, resnet50,
    # densenet201 and inception_v3, slower for EfficientNet-Lite (bench/train_cpu.py); off until checked on real data.
    cpu_bf16: bool = False


@dataclass
class EvaluateConfig:
    """How a run decides and is evaluated: calibration, operating points and study rule come from the validation part only.

    calibrate, target_*, aggregate, top_k and tta define the deployed decision (recorded in
    model.json); changing them on `covidscan evaluate` refits it on validation and updates model.json.
    """

    target_sensitivity: float = 0.95  # high-sensitivity operating point, chosen on validation; 0 = off
    target_specificity: float = 0.95  # high-specificity operating point, chosen on validation; 0 = off
    calibrate: bool = True  # temperature scaling, kept only if it helps on held-out validation patients
    aggregate: str = "auto"  # slices -> study: auto (chosen on validation patients) | mean | max | topk
    top_k: int = 3
    prevalence: float = 0.1  # stated prevalence for PPV/NPV (besides the test set's own)
    cam_method: str = "gradcam"  # gradcam | gradcam++ | xgradcam | layercam | eigencam | scorecam
    gallery_per_cell: int = 3  # heat maps per TP/FP/TN/FN cell and data set
    plausibility_images: int = 64  # images per data set for the lung-energy figure
    tsne_points: int = 500  # per data set (and for the training part)
    bootstrap: int = 1000
    tta: bool = False  # test-time augmentation: average with the left-right mirror


# A quick evaluation for experiments: every metric with its CI, but no heat maps, no t-SNE, fewer bootstrap resamples.
QUICK_EVALUATION = ["evaluate.gallery_per_cell=0", "evaluate.plausibility_images=0", "evaluate.tsne_points=0", "evaluate.bootstrap=200"]


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check/convert a value to the type of the field's default."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        if isinstance(value, list):  # e.g. ensemble.members: [vgg16, inception_v3]
            return ",".join(str(v).strip() for v in value)
        return str(value)
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def _apply(config: RunConfig, section: str, key: str, value: Any, origin: str) -> None:
    sections = {f.name for f in dataclasses.fields(config)}
    if section not in sections:
        hint = difflib.get_close_matches(section, sections, n=1)
        raise ConfigError(f"{origin}: unknown section {section!r}" + (f"; did you mean {hint[0]!r}?" if hint else f"; sections: {sorted(sections)}"))
    target = getattr(config, section)
    keys = {f.name for f in dataclasses.fields(target)}
    if key not in keys:
        hint = difflib.get_close_matches(key, keys, n=1)
        raise ConfigError(f"{origin}: unknown key {section}.{key}" + (f"; did you mean {section}.{hint[0]}?" if hint else f"; keys: {sorted(keys)}"))
    setattr(target, key, _coerce(value, getattr(target, key), f"{origin}: {section}.{key}"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- `section.key=value` overrides."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(config, str(section), str(key), value, str(path))
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote strings, e.g. {name}='{raw}'") from None
        _apply(config, section, key, value, f"override {item!r}")
    validate_config(config)
    return config


SELECTION = ("loss", "auc", "last")
SCHEDULES = ("constant", "cosine")
MIN_IMAGE_SIZE = 32  # five stride-2 stages leave a 1x1 feature map; smaller inputs break the backbones


def validate_config(config: RunConfig) -> None:
    from covidscan.models.classifier import TRANSFER_MODES

    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{item.name} must be a finite number, got {value}")
    size = config.data.image_size
    if size != 0 and not MIN_IMAGE_SIZE <= size <= 1024:
        raise ConfigError(f"data.image_size must be 0 (the backbone's size) or between {MIN_IMAGE_SIZE} and 1024, got {size}")
    from covidscan.data.preprocess import PREPROCESSING

    if config.data.preprocess not in PREPROCESSING:
        raise ConfigError(f"data.preprocess must be one of {', '.join(PREPROCESSING)}, got {config.data.preprocess!r}")
    if not config.data.positive_class.strip():
        raise ConfigError("data.positive_class must name a class, e.g. COVID")
    for name in ("head_epochs", "unfreeze_epochs", "patience", "threads"):
        if getattr(config.train, name) < 0:
            raise ConfigError(f"train.{name} must not be negative")
    if config.train.select not in SELECTION:
        raise ConfigError(f"train.select must be one of {', '.join(SELECTION)}, got {config.train.select!r}")
    t = config.train
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    if not (0.0 <= t.zoom < 1.0 and 0.0 <= t.shift <= 0.5 and t.mixup >= 0.0 and 0.0 <= t.label_smoothing < 1.0 and t.rotation_deg >= 0):
        raise ConfigError("train.zoom must be in [0, 1), train.shift in [0, 0.5], train.mixup >= 0, train.label_smoothing in [0, 1), "
                          "train.rotation_deg >= 0")
    if not 0.0 <= config.train.source_augment <= 1.0:
        raise ConfigError(f"train.source_augment is a probability in [0, 1], got {config.train.source_augment}")
    if config.train.weight_decay < 0 or not 0 < config.train.backbone_lr_scale <= 1 or not 0 < config.train.layer_decay <= 1:
        raise ConfigError("train.weight_decay must be >= 0; train.backbone_lr_scale and train.layer_decay must be in (0, 1]")
    e = config.evaluate
    if e.bootstrap < 0 or e.top_k < 1 or e.gallery_per_cell < 0 or e.plausibility_images < 0 or e.tsne_points < 0:
        raise ConfigError("evaluate.bootstrap, gallery_per_cell, plausibility_images and tsne_points must be >= 0, top_k >= 1")

    if config.model.transfer not in TRANSFER_MODES:
        raise ConfigError(f"model.transfer must be one of {list(TRANSFER_MODES)}, got {config.model.transfer!r}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
    if not (0.0 < config.split.test_size < 1.0 and 0.0 < config.split.val_size < 1.0 and config.split.test_size + config.split.val_size < 1.0):
        raise ConfigError("split.test_size and split.val_size must be in (0, 1) and sum to less than 1")
    for name in ("epochs", "batch_size"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1")
    if config.train.lr <= 0:
        raise ConfigError("train.lr must be positive")
    e = config.evaluate
    if not (0.0 <= e.target_sensitivity < 1.0 and 0.0 <= e.target_specificity < 1.0):
        raise ConfigError("evaluate.target_sensitivity and evaluate.target_specificity must be in [0, 1)")
    if e.aggregate not in ("auto", "mean", "max", "topk"):
        raise ConfigError(f"evaluate.aggregate must be auto, mean, max or topk, got {e.aggregate!r}")
    if not 0.0 < e.prevalence < 1.0:
        raise ConfigError(f"evaluate.prevalence must be in (0, 1), got {e.prevalence}")
    if config.ensemble.method not in ENSEMBLE_METHODS:
        raise ConfigError(f"ensemble.method must be one of {list(ENSEMBLE_METHODS)}, got {config.ensemble.method!r}")
    if e.cam_method not in ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam"):
        raise ConfigError(f"evaluate.cam_method: unknown method {e.cam_method!r}")


def packaged_config(name: str) -> Path:
    """Path of a config file shipped with the package (e.g. 'demo')."""
    return Path(str(resources.files("covidscan") / "configs" / f"{name}.yaml"))


def save_config(config: RunConfig, path: str | Path) -> None:
    from covidscan import atomic

    atomic.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
