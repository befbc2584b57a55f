"""Leakage-free splits: every patient's images fall on one side only.

Stratified by label, grouped by patient, seeded. Slices of one patient are
near-identical, so a slice-level split would measure memory, not diagnosis.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from covidscan.errors import DataError


def check_patient_groups(frame: pd.DataFrame, where: str = "manifest") -> pd.Series:
    """Return the patient ID per row; refuse missing IDs and patients with mixed labels."""
    patients = frame["patient_id"].astype(str).str.strip()
    missing = int((patients == "").sum())
    if missing:
        examples = frame.loc[patients == "", "path"].head(3).tolist()
        raise DataError(where, f"{missing} image(s) have no patient ID (e.g. {examples}); split by cluster instead")
    labels_per_patient = frame.groupby(patients)["label"].nunique()
    mixed = labels_per_patient[labels_per_patient > 1].index.tolist()
    if mixed:
        raise DataError(where, f"patient(s) with more than one label: {mixed[:10]}{' ...' if len(mixed) > 10 else ''}")
    return patients


_PARTS = np.array(["train", "val", "test"], dtype=object)


def _single_grouped_split(labels: np.ndarray, groups: np.ndarray, test_size: float, val_size: float, seed: int) -> np.ndarray:
    """One randomised greedy stratified group split.

    Groups go, largest first (with random jitter), to the part with the
    largest remaining class-wise deficit against its target counts.
    """
    rng = np.random.default_rng(seed)
    classes, y = np.unique(labels, return_inverse=True)
    names, g = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(names), len(classes)))
    np.add.at(counts, (g, y), 1)
    if (counts.sum(0) < 2).any():
        raise DataError("split", "each class needs at least 2 images to split")
    shares = np.array([1.0 - test_size - val_size, val_size, test_size])
    target = shares[:, None] * counts.sum(0)[None, :]
    current = np.zeros_like(target)
    order = np.argsort(-counts.sum(1) * rng.uniform(0.7, 1.3, len(names)))
    assignment = np.zeros(len(names), np.int64)
    for group in order:
        deficit = ((target - current) * counts[group][None, :]).sum(1) / counts[group].sum()
        part = int(np.argmax(deficit + rng.uniform(0, 1e-9, 3)))
        assignment[group] = part
        current[part] += counts[group]
    return _PARTS[assignment[g]]


def split_imbalance(split: np.ndarray, labels: np.ndarray, test_size: float, val_size: float) -> float:
    """How far a split is from its target sizes and class ratios (0 = perfect)."""
    overall = {c: float(np.mean(labels == c)) for c in np.unique(labels)}
    cost = 0.0
    for part, target in (("test", test_size), ("val", val_size)):
        mask = split == part
        cost += abs(float(mask.mean()) - target)
        if mask.any():
            cost += max(abs(float(np.mean(labels[mask] == c)) - share) for c, share in overall.items())
    return cost


def grouped_train_val_test(
    labels: np.ndarray, groups: np.ndarray, test_size: float, val_size: float, seed: int, candidates: int = 16
) -> np.ndarray:
    """Assign 'train'/'val'/'test' to every row, keeping each group on one side.

    With few, unequal groups one stratified draw can miss the target sizes and
    class ratios, so several seeded draws are made and the best balanced one
    kept: deterministic for `seed`, and no model or test metric is involved.
    """
    best, best_cost = None, float("inf")
    for k in range(candidates):
        split = _single_grouped_split(labels, groups, test_size, val_size, seed * 1000 + k)
        cost = split_imbalance(split, labels, test_size, val_size)
        if cost < best_cost - 1e-12:
            best, best_cost = split, cost
    assert best is not None
    return best


def split_by_patient(
    frame: pd.DataFrame, test_size: float = 0.2, val_size: float = 0.2, seed: int = 0, where: str = "manifest"
) -> pd.DataFrame:
    """A copy of `frame` with `group` (= patient) and `split` columns filled."""
    patients = check_patient_groups(frame, where)
    out = frame.copy()
    out["group"] = patients.values
    out["split"] = grouped_train_val_test(
        out["label"].astype(str).to_numpy(), patients.to_numpy(), test_size, val_size, seed
    )
    return out


# --- splits without patient IDs: similarity clusters ------------------------------------
# Calibrated on real CT (see BENCHMARKS.md): nearest neighbours from *different* patients
# (ucsd-covid-ct, which has IDs) never reached cosine 0.90 in ImageNet-feature space, and
# cross-class neighbours in sarscov2-ct reached 0.92 for 0.16 % of images. Pairs at or
# above this similarity are treated as the same scene (neighbouring slices, duplicates).
NEAR_DUPLICATE_SIMILARITY = 0.92
MAX_LEAKAGE_SHARE = 0.02  # a split leaking more test images than this is flagged
SPLIT_METHODS = ("patient", "cluster", "random", "auto")  # auto: patient when every image has a patient ID, else cluster


def default_group_count(n_images: int) -> int:
    """Total groups when none is given: 2 * sqrt(N), e.g. 100 groups for 2,500 slices.

    Published CT sets have tens of slices per patient (sarscov2-ct: ~2,500 slices of ~120
    patients), so this keeps groups about as coarse as patients, not far finer.
    """
    return max(4, int(round(2.0 * np.sqrt(n_images))))


def _union_labels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the bipartite graph linking labels of `a` and `b` per row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    n_a, n_b = int(a.max()) + 1, int(b.max()) + 1
    edges = coo_matrix((np.ones(len(a)), (a, n_a + b)), shape=(n_a + n_b, n_a + n_b))
    _, component = connected_components(edges, directed=False)
    return component[a]


def near_duplicate_components(embeddings: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY, chunk: int = 2048) -> np.ndarray:
    """Component label per image of the graph 'cosine similarity >= threshold' (chains included)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = [], []
    for start in range(0, len(embeddings), chunk):
        sims = embeddings[start : start + chunk] @ embeddings.T
        i, j = np.nonzero(sims >= threshold)
        rows.append(i + start)
        cols.append(j)
    n = len(embeddings)
    graph = coo_matrix((np.ones(sum(len(r) for r in rows)), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def cluster_groups(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_groups: int | None = None,
    threshold: float = NEAR_DUPLICATE_SIMILARITY,
    seed: int = 0,
) -> np.ndarray:
    """Groups for a leakage-free split when patient IDs are missing.

    1. Per class, average-linkage clustering of cosine distances into groups
       proportional to the class size (k-means above 8,000 images per class,
       as in the seed paper's class decomposition).
    2. Union with the components of the near-duplicate graph, so that a
       chain of similar slices never straddles train and test, even across
       classes.
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans

    total = n_groups or default_group_count(len(labels))
    groups = np.zeros(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        mask = labels == cls
        n = int(mask.sum())
        k = int(min(n, max(2, round(total * n / len(labels)))))
        if k >= n:
            part = np.arange(n)
        elif n > 8000:
            part = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(embeddings[mask])
        else:
            part = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(embeddings[mask])
        groups[mask] = part + offset
        offset += int(part.max()) + 1
    return _union_labels(groups, near_duplicate_components(embeddings, threshold))


def random_image_split(labels: np.ndarray, test_size: float, val_size: float, seed: int) -> np.ndarray:
    """Image-level stratified split: only to demonstrate leakage."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=seed)
    _, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=labels[rest], random_state=seed + 1)
    split = np.full(len(labels), "train", dtype=object)
    split[test], split[val] = "test", "val"
    return split


def group_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row from StratifiedGroupKFold: each group in exactly one fold."""
    n_groups = len(np.unique(groups))
    if folds < 2 or folds > n_groups:
        raise DataError("split", f"--folds must be between 2 and the number of groups ({n_groups}), got {folds}")
    fold = np.zeros(len(labels), np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[held_out] = k
    return fold


SAME_PICTURE_SIMILARITY = 0.99  # ImageNet-feature cosine of one picture re-used (copied, resized, re-encoded)


def calibrated_threshold(
    embeddings: np.ndarray, patient_ids: np.ndarray, base: float = NEAR_DUPLICATE_SIMILARITY, sample: int = 2000, seed: int = 0
) -> float:
    """With patient IDs, "near duplicate" must mean closer than different patients are in *this* data.

    The 99th percentile of each image's nearest-neighbour similarity among
    images of other patients, never below `base` and always below 0.99.
    Bounded because the pairs it is calibrated on include the pairs it must
    detect: when images are re-issued under new patient IDs those cross-ID
    pairs are near 1.0, and the unbounded percentile rose to 1.0 and hid them
    all. So pairs at or above 0.99 (the same picture) are left out of the
    calibration and the threshold stays below them, as long as they are a
    minority; when most images of different patients are that alike the data
    set is homogeneous and the threshold is calibrated on all of them. On
    homogeneous data (the synthetic phantom, where every patient looks alike)
    it rises above `base`; on real CT it stays there.
    """
    patient_ids = np.asarray(patient_ids).astype(str)
    if len(np.unique(patient_ids)) < 2:
        return base
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(embeddings), size=min(sample, len(embeddings)), replace=False)
    sims = embeddings[chosen] @ embeddings.T
    sims[patient_ids[chosen][:, None] == patient_ids[None, :]] = -1.0
    nearest = sims.max(1)
    distinct = nearest[nearest < SAME_PICTURE_SIMILARITY]
    if len(distinct) < len(nearest) / 2:  # homogeneous: nearly every patient looks like another
        return float(min(0.9999, max(base, np.percentile(nearest, 99))))
    return float(min(SAME_PICTURE_SIMILARITY - 1e-3, max(base, np.percentile(distinct, 99))))


def leakage_threshold(frame: pd.DataFrame, embeddings: np.ndarray, base: float = NEAR_DUPLICATE_SIMILARITY, seed: int = 0) -> float:
    """The near-duplicate threshold for a manifest: calibrated on its patients when all have IDs."""
    patient_ids = frame["patient_id"].astype(str).str.strip().to_numpy()
    return calibrated_threshold(embeddings, patient_ids, base, seed=seed) if (patient_ids != "").all() else base


def leakage_report(
    embeddings: np.ndarray, held_out: np.ndarray, train: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY
) -> dict[str, object]:
    """How many held-out images have a near duplicate among the training images.

    The leakage figure: share of held-out images whose nearest training image
    has cosine similarity >= threshold, and the median nearest-neighbour
    similarity held-out -> train (lower is more independent).
    """
    held, trained = embeddings[held_out], embeddings[train]
    if len(held) == 0 or len(trained) == 0:
        return {"test_images": int(len(held)), "threshold": threshold, "near_duplicates": 0, "share": 0.0,
                "median_nn_similarity": float("nan"), "flagged": False}
    nearest = np.concatenate([(held[s : s + 2048] @ trained.T).max(1) for s in range(0, len(held), 2048)])
    count = int((nearest >= threshold).sum())
    share = count / len(held)
    return {
        "test_images": int(len(held)),
        "threshold": threshold,
        "near_duplicates": count,
        "share": round(share, 4),
        "median_nn_similarity": round(float(np.median(nearest)), 4),
        "share_at_0.90": round(float((nearest >= 0.90).mean()), 4),
        "flagged": share > MAX_LEAKAGE_SHARE,
    }


def split_manifest(
    frame: pd.DataFrame,
    by: str,
    embeddings: np.ndarray,
    test_size: float = 0.2,
    val_size: float = 0.2,
    seed: int = 0,
    folds: int = 0,
    n_groups: int | None = None,
    threshold: float = NEAR_DUPLICATE_SIMILARITY,
    where: str = "manifest",
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Assign `group` and `split` (or `fold`) columns and measure the split's leakage."""
    if by not in SPLIT_METHODS:
        raise DataError(where, f"unknown split method {by!r}; choose one of {list(SPLIT_METHODS)}")
    if folds:
        if folds < 2:
            raise DataError(where, f"--folds must be at least 2, got {folds}")
    elif not (0.0 < test_size < 1.0 and 0.0 < val_size < 1.0 and test_size + val_size < 1.0):
        raise DataError(where, f"test size {test_size} and validation size {val_size} must each be in (0, 1) and sum to less than 1")
    labels = frame["label"].astype(str).to_numpy()
    if len(set(labels)) < 2:
        raise DataError(where, f"only one class ({labels[0]!r}) in the manifest: a split needs at least two classes to stratify and to evaluate")
    out = frame.copy()
    warning = ""
    if by == "auto":
        by = "patient" if "patient_id" in frame.columns and (frame["patient_id"].astype(str).str.strip() != "").all() else "cluster"
    if by == "patient":
        groups = check_patient_groups(frame, where).to_numpy()
    elif by == "cluster":
        groups = np.array([f"cluster-{g}" for g in cluster_groups(embeddings, labels, n_groups, threshold, seed)], dtype=object)
    else:
        groups = np.array([f"image-{i}" for i in range(len(frame))], dtype=object)
        warning = "random image-level split: neighbouring slices of one patient land in train and test; use it only to demonstrate leakage"
    out["group"] = groups
    threshold = leakage_threshold(frame, embeddings, threshold, seed)
    report: dict[str, object] = {"by": by, "seed": seed, "groups": int(len(np.unique(groups))), "warning": warning}
    if folds:
        out["fold"] = group_folds(labels, groups, folds, seed) if by != "random" else np.random.default_rng(seed).permutation(len(labels)) % folds
        out["split"] = ""
        report["leakage_per_fold"] = [
            leakage_report(embeddings, np.flatnonzero(out["fold"] == k), np.flatnonzero(out["fold"] != k), threshold) for k in range(folds)
        ]
        report["flagged"] = any(bool(r["flagged"]) for r in report["leakage_per_fold"])  # type: ignore[union-attr]
    else:
        if by == "random":
            out["split"] = random_image_split(labels, test_size, val_size, seed)
        else:
            out["split"] = grouped_train_val_test(labels, groups, test_size, val_size, seed)
        split = out["split"].to_numpy()
        train = np.flatnonzero(split == "train")
        report["leakage_test"] = leakage_report(embeddings, np.flatnonzero(split == "test"), train, threshold)
        report["leakage_val"] = leakage_report(embeddings, np.flatnonzero(split == "val"), train, threshold)
        report["flagged"] = bool(report["leakage_test"]["flagged"])  # type: ignore[index]
        report["counts"] = {
            part: {"images": int((split == part).sum()), "groups": int(len(np.unique(groups[split == part]))),
                   "classes": {c: int(((split == part) & (labels == c)).sum()) for c in np.unique(labels)}}
            for part in ("train", "val", "test")
        }
        report["group_ids"] = {part: sorted(map(str, np.unique(groups[split == part]))) for part in ("train", "val", "test")}
    return out, report
