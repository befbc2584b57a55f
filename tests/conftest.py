"""Shared fixtures: small synthetic data sets made in the test, never real data."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset

torch.set_num_threads(2)
# The patient-key secret of this test session (never the developer's own ~/.config one); subprocesses inherit it.
os.environ["COVIDSCAN_SECRET_FILE"] = os.path.join(tempfile.mkdtemp(prefix="covidscan-secret-"), "patient-key.secret")


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 patients per class, 3 slices each, 48 px: enough to split and train briefly."""
    root = tmp_path_factory.mktemp("phantom")
    return generate_phantom_dataset(root, PhantomSpec(patients_per_class=8, slices_per_patient=3, image_size=48, seed=1))


TINY = ["data.image_size=48", "train.epochs=2", "train.head_epochs=1", "train.batch_size=16", "split.test_size=0.25", "split.val_size=0.25"]


@pytest.fixture(scope="session")
def tiny_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and evaluated run on the tiny phantom (shared: tests copy it before changing it)."""
    from covidscan.config import load_config
    from covidscan.data.sources import index_folder
    from covidscan.pipeline import train_run

    run = tmp_path_factory.mktemp("run")
    train_run(index_folder(tiny_phantom), load_config(None, TINY), run, show_progress=False, log=lambda m: None)
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to an ONNX bundle."""
    from covidscan.export.onnx import export_run

    bundle = tmp_path_factory.mktemp("bundle") / "bundle"
    export_run(tiny_run, bundle)
    return bundle
