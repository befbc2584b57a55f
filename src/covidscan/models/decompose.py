"""DeTraC's first step: split each class into sub-classes by k-means on pretrained features.

Decompose (this module): features of the training images from the pretrained
backbone, PCA, k-means per class; Transfer: the network is fine-tuned on the
sub-class labels (train.engine); Compose: sub-class probabilities are summed
per class (model_card.LabelSpace, CovidClassifier.compose). Irregular classes
(e.g. COVID lesions of different kinds) become several regular ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidscan.errors import ConfigError
from covidscan.model_card import LabelSpace

AUTO_RANGE = (2, 3, 4)  # k tried per class when decompose=auto, chosen by silhouette
PCA_VARIANCE = 0.95
MIN_PER_SUBCLASS = 5  # a class is split into k only when it has at least 5k training images


@dataclass(frozen=True)
class Decomposition:
    labels: LabelSpace
    output_labels: np.ndarray  # sub-class index of each training image
    report: dict[str, object]


def parse_decompose(setting: str, classes: list[str]) -> dict[str, int | str] | None:
    """model.decompose: 'off', 'auto', 'K' (every class) or 'CLASS=K,CLASS=K' (others stay whole). None = off."""
    text = setting.strip()
    if text.lower() in ("", "off", "none", "false", "0"):
        return None
    if text.lower() == "auto":
        return {c: "auto" for c in classes}
    if text.isdigit():
        return {c: _k(text, setting) for c in classes}
    wanted: dict[str, int | str] = {c: 1 for c in classes}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in classes:
            raise ConfigError(f"model.decompose={setting!r}: expected off, auto, K or CLASS=K,...; classes are {classes}")
        wanted[name.strip()] = "auto" if value.strip().lower() == "auto" else _k(value.strip(), setting)
    return wanted


def _k(value: str, setting: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 16:
        raise ConfigError(f"model.decompose={setting!r}: the number of sub-classes must be 1 to 16, got {value!r}")
    return int(value)


def decompose_classes(features: np.ndarray, labels: np.ndarray, classes: list[str], wanted: dict[str, int | str], seed: int = 0) -> Decomposition:
    """Sub-class labels for training images from their pretrained features (N, D) and class labels (N,)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, int)
    reduced = PCA(n_components=PCA_VARIANCE, svd_solver="full").fit_transform(features) if len(features) > 2 else features
    parts, assignment, per_class = [], np.zeros(len(labels), int), {}
    offset = 0
    for index, name in enumerate(classes):
        rows = np.flatnonzero(labels == index)
        choice = wanted.get(name, 1)
        candidates = [k for k in (AUTO_RANGE if choice == "auto" else (int(choice),)) if 1 <= k and k * MIN_PER_SUBCLASS <= len(rows)] or [1]
        best_k, best_score, best_clusters, scores = 1, -np.inf, np.zeros(len(rows), int), {}
        for k in candidates:
            if k == 1:
                clusters, score = np.zeros(len(rows), int), -np.inf
            else:
                clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(reduced[rows])
                score = float(silhouette_score(reduced[rows], clusters)) if len(np.unique(clusters)) > 1 else -np.inf
                scores[str(k)] = round(score, 4)
            if k == candidates[0] or score > best_score:
                best_k, best_score, best_clusters = k, score, clusters
        # k-means may leave a cluster tiny: relabel clusters by size, dropping empty ones
        sizes = np.bincount(best_clusters, minlength=best_k)
        order = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] > 0]
        remap = {c: i for i, c in enumerate(order)}
        assignment[rows] = offset + np.array([remap[c] for c in best_clusters], int)
        parts.append(len(order))
        per_class[name] = {"sub_classes": len(order), "sizes": [int(sizes[c]) for c in order],
                           "asked": choice, **({"silhouette": scores} if scores else {})}
        offset += len(order)
    space = LabelSpace.decomposed(classes, parts)
    report = {
        "method": f"k-means per class on PCA ({PCA_VARIANCE:.0%} of variance, {reduced.shape[1]} components) of the pretrained backbone's pooled features",
        "k_choice": f"silhouette over k in {list(AUTO_RANGE)} where 'auto'; at least {MIN_PER_SUBCLASS} images per sub-class",
        "outputs": list(space.outputs), "per_class": per_class, "training_images": int(len(labels)),
    }
    return Decomposition(space, assignment, report)
