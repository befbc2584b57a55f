"""Local fine-tuning of a trained model with a few labelled patients of a new hospital (issue 14, P5).

A hospital that finds the model weak on its own images labels a few
patients and fine-tunes. With a handful of patients there is nothing to
select an epoch on, so the schedule is fixed (`train.select=last`, a few
epochs at a lower learning rate); and to keep what the model knew, every
batch draws half from the local patients and half from a replay sample of
the source run's training images (`train.balance_sources`). The validation
and test parts stay the source run's: the calibration, thresholds and gate
threshold come from images never trained on, and the test part measures
what fine-tuning cost on the source hospital. The new hospital's own held-out
patients are evaluated as an external set (`--external`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from covidscan.errors import CovidscanError, DataError
from covidscan.model_card import NETWORK

# The fixed schedule; any of it can be changed with --set.
FINETUNE_SETTINGS = [
    "train.epochs=5", "train.head_epochs=0", "train.unfreeze_epochs=1", "train.select=last",
    "train.balance_sources=true", "train.lr=0.0001",
]
REPLAY_MIN = 256  # source training images replayed at least; 4x the local images when that is more


def patient_keys(frame: pd.DataFrame) -> np.ndarray:
    """The patient of each row; an image without a patient ID is its own patient."""
    ids = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame.columns else np.full(len(frame), "")
    return np.where(ids == "", "image:" + frame["path"].astype(str).to_numpy(), ids)


def sample_patients(frame: pd.DataFrame, k: int, draw: int, positive: str, where: str) -> pd.DataFrame:
    """All images of k whole patients: ceil(k/2) positive and the rest negative (a patient's class is its
    images' majority), drawn with seed `draw`. Every draw of a k is a different, reproducible hospital sample."""
    keys = patient_keys(frame)
    is_positive = pd.Series(frame["label"].astype(str).to_numpy() == positive).groupby(keys).mean() > 0.5
    pools = {True: sorted(is_positive.index[is_positive]), False: sorted(is_positive.index[~is_positive])}
    wanted = {True: (k + 1) // 2, False: k // 2}
    for cls, n in wanted.items():
        if n > len(pools[cls]):
            raise DataError(where, f"{k} patients asked for, but only {len(pools[cls])} {'positive' if cls else 'negative'} patients "
                                   f"(need {n}); choose a smaller --patients")
    rng = np.random.default_rng(draw)
    chosen = {str(p) for cls, n in wanted.items() for p in rng.choice(np.array(pools[cls], dtype=object), n, replace=False)}
    return frame[np.isin(keys, list(chosen))].copy()


def finetune_run(
    source_run: str | Path,
    local: pd.DataFrame,
    out: str | Path,
    name: str,
    patients: int = 0,
    draw: int = 0,
    overrides: list[str] | None = None,
    externals: dict[str, pd.DataFrame] | None = None,
    show: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """Fine-tune the run's network on `local` labelled images (all, or `patients` whole patients); write and evaluate OUT."""
    from covidscan.config import load_config
    from covidscan.data.manifest import load_manifest
    from covidscan.model_card import read_model_card
    from covidscan.pipeline import train_run
    from covidscan.predict import MODEL_CARD

    source_run, out = Path(source_run), Path(out)
    card = read_model_card(source_run / MODEL_CARD, f"{source_run}: not a trained run folder (no {MODEL_CARD})")
    if card.kind != NETWORK:
        raise CovidscanError(f"{source_run}: finetune works on one network; fine-tune each member of an ensemble, then combine them again")
    if out.exists() and any(out.iterdir()):
        raise CovidscanError(f"{out}: folder exists and is not empty; choose another -o")
    config = load_config(source_run / "config.yaml", FINETUNE_SETTINGS + list(overrides or []))
    config.model.init_from = str(source_run)
    unknown = sorted(set(local["label"].astype(str)) - set(card.classes))
    if unknown:
        raise DataError(name, f"labels {unknown} are not classes of the model {card.classes}")
    chosen = sample_patients(local, patients, draw, card.labels.positive, name) if patients else local.copy()
    if chosen["label"].nunique() < 2:
        raise DataError(name, f"the local images hold one class only ({chosen['label'].iloc[0]}); fine-tuning needs both")
    source_frame = load_manifest(source_run / "manifest.csv")
    train_part = source_frame[source_frame["split"] == "train"]
    replay = train_part.sample(n=min(len(train_part), max(REPLAY_MIN, 4 * len(chosen))), random_state=draw)
    chosen["source"], chosen["split"], chosen["group"] = f"local:{name}", "train", "local:" + pd.Series(patient_keys(chosen), index=chosen.index)
    frame = pd.concat([chosen, replay, source_frame[source_frame["split"].isin(["val", "test"])]], ignore_index=True)
    frame = frame.fillna("")
    n_patients = len(set(patient_keys(chosen)))
    provenance = {"local_finetune": {
        "source_run": source_run.name, "data": name, "patients": n_patients, "images": int(len(chosen)),
        "patients_drawn": f"{patients} (draw {draw}: half positive, whole patients)" if patients else "all labelled images given",
        "replayed_source_images": int(len(replay)),
        "schedule": ", ".join(FINETUNE_SETTINGS + list(overrides or [])),
        "decision_fitted_on": "the source run's validation part (calibration, thresholds, gate threshold); "
                              "the test part is the source run's: it measures what fine-tuning cost there",
    }}
    log(f"fine-tuning {source_run} on {len(chosen)} images of {n_patients} patients of {name} "
        f"(+ {len(replay)} replayed source images, drawn equally often)")
    return train_run(frame, config, out, show_progress=show, log=log, externals=externals, provenance=provenance)
