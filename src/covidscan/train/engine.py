"""The training loop: whole data set as uint8 tensors, batched augmentation,
transfer modes, early stopping, atomic checkpoints and exact resume.

Every epoch re-seeds its own generator from (seed, epoch), so an epoch's
shuffling, augmentation and dropout do not depend on what ran before: a run
resumed from its last checkpoint repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covidscan import atomic
from covidscan.config import TrainConfig
from covidscan.data.source_augment import imitate_sources
from covidscan.data.transforms import AugmentConfig, Normaliser, augment, to_float
from covidscan.evaluate.metrics import auc_roc
from covidscan.models.classifier import CovidClassifier, HeadPath
from covidscan.train.checkpoint import load_checkpoint, save_checkpoint
from covidscan.train.distributed import Dist, barrier, mean_across_ranks, ranks_agree, wrap

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"
HISTORY = "history.jsonl"
HISTORY_CSV = "history.csv"  # the same rows, for spreadsheets


@dataclass
class TensorData:
    """Images as uint8 (N, 1, H, W) and integer labels, on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    draw_weights: torch.Tensor | None = None  # per image: sampled with these weights (with replacement) instead of shuffled

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TensorData:
        return TensorData(self.images.to(device), self.labels.to(device), self.draw_weights)


def source_weights(sources: np.ndarray) -> torch.Tensor:
    """Draw weights that give every source the same share of an epoch, whatever its size."""
    names, index, counts = np.unique(sources.astype(str), return_inverse=True, return_counts=True)
    return torch.from_numpy(1.0 / (len(names) * counts[index])).double()


def _memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _autocast(device: torch.device, cpu_bf16: bool = False) -> torch.autocast:
    """bf16 autocast: always on a GPU; on the CPU only when asked (train.cpu_bf16; faster for the seed backbones)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or (cpu_bf16 and device.type == "cpu"))


@torch.no_grad()
def predict_proba(
    model: CovidClassifier, images: torch.Tensor, normaliser: Normaliser, batch_size: int = 64
) -> np.ndarray:
    """Class probabilities (N, C) for uint8 images, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = normaliser(to_float(images[start : start + batch_size].to(device)))
        with _autocast(device):
            logits = model(batch)
        out.append(logits.float().softmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, int(model.membership.shape[0])), np.float32)


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float().clamp(min=1)
    return (counts.sum() / (num_classes * counts)).to(labels.device)


def _make_optimizer(model: CovidClassifier, cfg: TrainConfig, transfer: str) -> torch.optim.Optimizer:
    """Adam with one parameter group for the head and, for 'fine', one per backbone layer group
    (layer-wise learning-rate decay: deeper groups learn more slowly)."""
    head = {"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}
    if transfer != "fine":
        return torch.optim.Adam(
            [{"params": list(model.backbone.parameters()), "lr": cfg.lr, "name": "backbone"}, head], weight_decay=cfg.weight_decay
        )
    named = dict(model.backbone.named_parameters())
    groups = model.layer_groups()
    top_lr = cfg.lr * cfg.backbone_lr_scale
    param_groups = [
        {"params": [named[n] for n in names], "lr": top_lr * cfg.layer_decay ** (len(groups) - 1 - i), "name": f"backbone.{i}"}
        for i, names in enumerate(groups)
    ]
    return torch.optim.Adam(param_groups + [head], weight_decay=cfg.weight_decay)


def learning_rate_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The share of each group's base learning rate used in `epoch` (0-based): cosine decays to 0 at the last epoch's end."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))
    return 1.0


def _set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's base rate (kept in the group, so that a resumed run continues the same schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def _mix(batch: torch.Tensor, target: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., 2018): each image blended with another of the batch; returns the partner targets and the weight."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    weight = float(np.random.default_rng(seed).beta(alpha, alpha))
    partner = torch.randperm(batch.shape[0], generator=generator).to(batch.device)
    return weight * batch + (1.0 - weight) * batch[partner], target[partner], weight


def _trainable_groups(transfer: str, epoch: int, cfg: TrainConfig, n_groups: int) -> int:
    """How many backbone layer groups (deepest first) train in this epoch."""
    if transfer == "shallow":
        return 0
    if transfer == "deep":
        return n_groups
    if epoch < cfg.head_epochs:
        return 0
    step = max(1, -(-n_groups // max(1, cfg.unfreeze_epochs)))  # ceil: all groups train after unfreeze_epochs
    return min(n_groups, (epoch - cfg.head_epochs + 1) * step)


def _train_one_epoch(
    model: CovidClassifier,
    data: TensorData,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    normaliser: Normaliser,
    generator: torch.Generator,
    loss_weight: torch.Tensor | None,
    ctx: Dist,
) -> float:
    """One epoch. Under DDP every rank draws the same global batch and trains on its slice."""
    model.train()
    device = data.images.device
    # DDP wraps what trains this epoch: the head alone while the backbone is frozen.
    runner = wrap(ctx, HeadPath(model.dropout, model.head) if model.frozen_backbone else model, device)
    if data.draw_weights is None:
        order = torch.randperm(len(data), generator=generator).to(device)
    else:
        order = torch.multinomial(data.draw_weights, len(data), replacement=True, generator=generator).to(device)
    aug_cfg = AugmentConfig(rotation_deg=cfg.rotation_deg, scale=(1.0 - cfg.zoom, 1.0 + cfg.zoom), shift=cfg.shift)
    total, seen = 0.0, 0
    for start in range(0, len(data), cfg.batch_size):
        index = order[start : start + cfg.batch_size]
        if index.numel() < 2 * ctx.world and seen:  # a slice of one breaks BatchNorm; drop the remainder
            break
        batch = to_float(data.images[index])
        if cfg.augment:
            batch = augment(batch, generator, aug_cfg)
        if cfg.source_augment > 0:
            batch = imitate_sources(batch, generator, cfg.source_augment)
        target = data.labels[index]
        partner, weight = target, 1.0
        if cfg.mixup > 0:
            batch, partner, weight = _mix(batch, target, cfg.mixup, generator)
        batch = normaliser(batch)[ctx.rank :: ctx.world].contiguous(memory_format=_memory_format(cfg))
        target, partner = target[ctx.rank :: ctx.world], partner[ctx.rank :: ctx.world]
        with _autocast(device, cfg.cpu_bf16):
            if model.frozen_backbone:
                with torch.no_grad():
                    features = model.forward_features(batch)
                logits = runner(features)
            else:
                logits = runner(batch, composed=False)  # one logit per output: sub-classes when decomposed
            logits = logits.float()
            loss = F.cross_entropy(logits, target, weight=loss_weight, label_smoothing=cfg.label_smoothing)
            if weight < 1.0:  # mixup: the partner images' targets with the rest of the weight
                loss = weight * loss + (1.0 - weight) * F.cross_entropy(logits, partner, weight=loss_weight, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(target)
        seen += len(target)
    return mean_across_ranks(ctx, total / max(seen, 1))


def _validate(model: CovidClassifier, data: TensorData, normaliser: Normaliser, batch_size: int, positive: int) -> dict[str, float]:
    probs = predict_proba(model, data.images, normaliser, batch_size)
    labels = data.labels.cpu().numpy()
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)), torch.from_numpy(labels)))
    return {
        "val_loss": loss,
        "val_accuracy": float((probs.argmax(1) == labels).mean()),
        "val_auc": auc_roc(labels == positive, probs[:, positive]) if probs.shape[1] == 2 else math.nan,
    }


SELECTION_NAMES = {"loss": "loss", "auc": "AUC", "last": "(none: last epoch)"}


def selection_rule(select: str, num_classes: int) -> str:
    """'auc' needs two classes in the validation part; otherwise it falls back to the loss."""
    return "loss" if select == "auc" and num_classes != 2 else select


def _improves(row: dict[str, float], state: dict[str, object], selection: str) -> bool:
    """Is this epoch better than the kept one? AUC ties (within 1e-4) are broken by the loss."""
    if selection == "last":
        return True
    better_loss = row["val_loss"] < float(state["best_loss"]) - 1e-6  # type: ignore[arg-type]
    if selection == "loss" or math.isnan(row["val_auc"]):
        return better_loss
    best_auc = float(state["best_auc"])  # type: ignore[arg-type]
    return row["val_auc"] > best_auc + 1e-4 or (abs(row["val_auc"] - best_auc) <= 1e-4 and better_loss)


def selection_report(history: list[dict[str, float]], selection: str, kept: int) -> dict[str, object]:
    """Which epoch was kept and why, and what the other criterion would have kept: a recipe that keeps
    a head-only epoch while validation AUC kept climbing (issue 14) is visible in the report."""
    aucs = [r["val_auc"] for r in history if not math.isnan(r["val_auc"])]
    report: dict[str, object] = {"on": SELECTION_NAMES[selection], "kept_epoch": kept}
    if aucs:
        by_auc = max(history, key=lambda r: (r["val_auc"], -r["val_loss"]))
        kept_row = history[kept - 1] if 0 < kept <= len(history) else by_auc
        report.update({"best_auc_epoch": int(by_auc["epoch"]), "best_val_auc": float(by_auc["val_auc"]), "kept_val_auc": float(kept_row["val_auc"])})
        if selection != "last" and kept_row["val_auc"] < by_auc["val_auc"] - 0.05:
            report["warning"] = (f"the kept epoch {kept} has validation AUC {kept_row['val_auc']:.3f}, epoch {int(by_auc['epoch'])} "
                                 f"reached {by_auc['val_auc']:.3f}: loss and AUC disagree (consider train.select=auc)")
    return report


def fit(
    model: CovidClassifier,
    train: TensorData,
    val: TensorData,
    cfg: TrainConfig,
    transfer: str,
    normaliser: Normaliser,
    run_dir: str | Path,
    positive: int = 1,
    resume: bool = False,
    log: Callable[[str], None] = print,
    ctx: Dist = Dist(),
) -> dict[str, object]:
    """Train with early stopping on the selection score (train.select); leave the kept weights in `model`.

    `train` labels index the model's outputs (sub-classes when decomposed);
    `val` labels index classes: validation scores the composed probabilities.

    Under DDP (`ctx.enabled`) only rank 0 writes files; all ranks validate on
    the full validation set and so take the same early-stopping decisions.
    """
    run_dir = Path(run_dir)
    num_classes = model.head.out_features
    model.to(memory_format=_memory_format(cfg))  # before the optimizer: it holds the parameters themselves
    optimizer = _make_optimizer(model, cfg, transfer)
    loss_weight = _class_weights(train.labels, num_classes) if cfg.class_balanced else None
    state: dict[str, object] = {"epoch": -1, "best_loss": math.inf, "best_auc": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [], "finished": False}
    selection = selection_rule(cfg.select, num_classes=len(val.labels.unique()))
    if resume and (run_dir / LAST).is_file():
        model.freeze_backbone(False)  # parameters must be trainable to load optimizer state
        state = load_checkpoint(run_dir / LAST, model, optimizer)
        state.setdefault("best_auc", -math.inf)  # checkpoints written before train.select existed
        log(f"resuming after epoch {int(state['epoch']) + 1} from {run_dir / LAST}")
    history: list[dict[str, float]] = list(state["history"])  # type: ignore[arg-type]
    epoch = int(state["epoch"]) + 1
    while not state["finished"] and epoch < cfg.epochs:
        started = time.perf_counter()
        epoch_seed = cfg.seed * 1_000_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)  # dropout
        n_groups = len(model.layer_groups())
        trainable = _trainable_groups(transfer, epoch, cfg, n_groups)
        model.set_trainable_groups(trainable)
        _set_learning_rate(optimizer, learning_rate_factor(cfg.schedule, epoch, cfg.epochs))
        train_loss = _train_one_epoch(model, train, optimizer, cfg, normaliser, generator, loss_weight, ctx)
        phase = "frozen" if trainable == 0 else "trained" if trainable == n_groups else f"top {trainable}/{n_groups} groups"
        row = {"epoch": epoch + 1, "backbone": phase, "train_loss": train_loss}
        row.update(_validate(model, val, normaliser, cfg.batch_size, positive))
        row["seconds"] = round(time.perf_counter() - started, 2)
        history.append(row)
        improved = _improves(row, state, selection)
        if improved:
            state["best_loss"], state["best_auc"], state["best_epoch"], state["bad_epochs"] = row["val_loss"], row["val_auc"], epoch + 1, 0
            if ctx.is_main:
                save_checkpoint(run_dir / BEST, model, {"epoch": epoch + 1, "val_loss": row["val_loss"], "val_auc": row["val_auc"]})
        else:
            state["bad_epochs"] = int(state["bad_epochs"]) + 1  # type: ignore[call-overload]
        stop_early = selection != "last" and int(state["bad_epochs"]) >= cfg.patience  # type: ignore[call-overload]
        state["finished"] = stop_early or epoch + 1 >= cfg.epochs
        state["epoch"], state["history"] = epoch, history
        model.freeze_backbone(False)
        if ctx.is_main:
            save_checkpoint(run_dir / LAST, model, state, optimizer)
            atomic.write_text(run_dir / HISTORY, "".join(json.dumps(r) + "\n" for r in history))
            atomic.write_with(run_dir / HISTORY_CSV, lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False))
        barrier(ctx)
        log(
            f"epoch {epoch + 1}/{cfg.epochs} [{row['backbone']}] train loss {train_loss:.4f}  "
            f"val loss {row['val_loss']:.4f}  val acc {row['val_accuracy']:.3f}  val AUC {row['val_auc']:.3f}  "
            f"({row['seconds']:.1f} s){'  *best' if improved else ''}"
        )
        epoch += 1
    if selection != "last" and int(state["bad_epochs"]) >= cfg.patience and epoch < cfg.epochs:  # type: ignore[call-overload]
        log(f"early stop: validation {SELECTION_NAMES[selection]} did not improve for {cfg.patience} epochs")
    selected = selection_report(history, selection, int(state["best_epoch"]))  # type: ignore[call-overload]
    if "warning" in selected:
        log(f"WARNING: {selected['warning']}")
    barrier(ctx)
    load_checkpoint(run_dir / BEST, model)
    model.freeze_backbone(False)
    return {
        "best_epoch": state["best_epoch"], "best_val_loss": state["best_loss"], "epochs_run": len(history),
        "selection": selected,
        "world_size": ctx.world, "ranks_agree": ranks_agree(ctx, model), "history": history,
        "memory_format": "channels_last" if cfg.channels_last else "contiguous", "threads": torch.get_num_threads(),
        "training_precision": "bf16 autocast" if cfg.cpu_bf16 or train.images.device.type == "cuda" else "fp32",
    }
