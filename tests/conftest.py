"""Shared fixtures: small synthetic data sets made in the test, never real data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 patients per class, 3 slices each, 48 px: enough to split and train briefly."""
    root = tmp_path_factory.mktemp("phantom")
    return generate_phantom_dataset(root, PhantomSpec(patients_per_class=8, slices_per_patient=3, image_size=48, seed=1))
