"""2-D maps of model embeddings, and a number for what they separate: disease or hospitals?"""
from __future__ import annotations

import math

import numpy as np
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE coordinates (N, 2), seeded; perplexity shrinks for small sets."""
    n = len(embeddings)
    if n < 4:
        return np.zeros((n, 2), np.float32)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(embeddings)
    return coords.astype(np.float32)


def silhouette(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Cosine silhouette of a labelling in embedding space: near 0, the labels are mixed; near 1, well separated."""
    labels = np.asarray(labels).astype(str)
    if len(np.unique(labels)) < 2 or len(labels) <= len(np.unique(labels)):
        return math.nan
    return float(silhouette_score(embeddings, labels, metric="cosine"))
