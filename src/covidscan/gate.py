"""The input gate: refuse images unlike the training images (torch-free).

An image's gate statistics (per-channel mean and SD of an intermediate
feature stage) are compared with the training images' by Mahalanobis
distance; the refusal threshold is a high quantile of the distances of
*validation* images, i.e. unseen patients of the same kind. The run folder
holds the gate (gate.npz) so evaluation refuses what the service refuses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GATE_QUANTILE = 0.995  # of validation distances: ~0.5 % of real unseen scans are refused
GATE_MAX_DIMS = 256
GATE_ARRAYS = ("center", "projection", "location", "precision")
GATE_METHOD = "Mahalanobis distance of intermediate feature statistics (Ledoit-Wolf)"


def gate_reference(train_stats: np.ndarray, val_stats: np.ndarray) -> dict[str, np.ndarray | float]:
    """Fit on training statistics (Ledoit-Wolf after PCA); threshold from validation distances."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    train_stats, val_stats = np.asarray(train_stats, np.float64), np.asarray(val_stats, np.float64)
    dims = min(train_stats.shape[1], GATE_MAX_DIMS, max(1, len(train_stats) - 1))
    pca = PCA(dims, random_state=0).fit(train_stats)
    covariance = LedoitWolf().fit((train_stats - pca.mean_) @ pca.components_.T)
    reference = {"center": pca.mean_, "projection": pca.components_, "location": covariance.location_, "precision": covariance.precision_}
    distances = gate_distance(reference, val_stats)
    return {**reference, "threshold": float(np.quantile(distances, GATE_QUANTILE)), "val_distances": distances}


def gate_distance(reference: dict[str, np.ndarray], gate_features: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of gate statistics (N, D) from the training reference."""
    z = (np.asarray(gate_features, np.float64) - reference["center"]) @ reference["projection"].T - reference["location"]
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", z, reference["precision"], z), 0.0))


def save_gate(reference: dict[str, np.ndarray | float], path: Path) -> None:
    from covidscan import atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: savez would append ".npz" to a path
            np.savez_compressed(handle, **{k: np.asarray(reference[k], np.float32) for k in GATE_ARRAYS})

    atomic.write_with(path, write)


def load_gate(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as gate:
        return {k: gate[k].astype(np.float64) for k in GATE_ARRAYS}
