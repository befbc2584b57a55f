"""Preprocessing (lung crop, CLAHE): what it does to an image, and that training and serving prepare images alike."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from covidscan.data.io import read_image
from covidscan.data.preprocess import prepare_image
from covidscan.errors import ConfigError
from tests.conftest import TINY


def _slice(tiny_phantom: Path) -> np.ndarray:
    return read_image(sorted(tiny_phantom.glob("COVID/*/*.png"))[0]).pixels


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def test_lung_crop_finds_the_same_lungs_inside_a_paper_figure(tiny_phantom: Path) -> None:
    """A slice pasted into a figure (white margin, caption letters, an arrow) crops back to about the same input."""
    slice_ = _slice(tiny_phantom)
    h, w = slice_.shape
    canvas = Image.new("F", (3 * w, 2 * h), 1.0)
    canvas.paste(Image.fromarray(slice_, mode="F"), (w // 2, h // 3))
    draw = ImageDraw.Draw(canvas)
    draw.text((5, h // 3 + h + 8), "Figure 2. COVID-19, day 7", fill=0.0)  # the caption, below the scan
    draw.line((2 * w, h // 2, 1.6 * w, 0.8 * h), fill=0.0, width=3)
    figure = np.asarray(canvas, np.float32)
    plain, cropped, reference = prepare_image(figure, 64), prepare_image(figure, 64, "lung_crop"), prepare_image(slice_, 64, "lung_crop")
    assert _corr(cropped, reference) > 0.9 > _corr(plain, reference) + 0.2
    blank = np.full((50, 50), 0.5, np.float32)  # no lung region: resized as it is, never an error
    assert np.array_equal(prepare_image(blank, 32, "lung_crop"), prepare_image(blank, 32))


def test_clahe_evens_out_a_washed_out_window(tiny_phantom: Path) -> None:
    slice_ = _slice(tiny_phantom)
    washed = 0.6 + 0.2 * slice_  # a narrow, bright window: another scanner's export
    flat, equalised = prepare_image(washed, 64), prepare_image(washed, 64, "clahe")
    assert equalised.dtype == np.uint8 and equalised.shape == (64, 64)
    assert equalised.std() > 1.5 * flat.std()
    assert _corr(prepare_image(slice_, 64, "clahe"), equalised) > 0.8
    with pytest.raises(ValueError, match="unknown preprocessing"):
        prepare_image(slice_, 64, "sharpen")


@pytest.mark.parametrize("method", ["histeq", "lung_zscore"])
def test_intensity_standardisation_maps_two_exposures_of_one_slice_to_about_one_image(tiny_phantom: Path, method: str) -> None:
    """Histogram equalisation and the lung z-score undo a source's window: a dark, flat export and a bright, washed-out
    one of the same slice become about the same input (a plain resize keeps them far apart)."""
    slice_ = _slice(tiny_phantom)
    dark, washed = 0.1 + 0.3 * slice_, 0.55 + 0.25 * slice_
    plain = np.abs(prepare_image(dark, 64).astype(float) - prepare_image(washed, 64).astype(float)).mean()
    a, b = prepare_image(dark, 64, method), prepare_image(washed, 64, method)
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 0.2 * plain
    assert _corr(a, b) > 0.95 and a.std() > 20  # the anatomy stays, with contrast


def test_preprocessing_is_recorded_and_the_service_prepares_images_as_training_did(tiny_phantom: Path, tmp_path: Path) -> None:
    from covidscan.config import load_config
    from covidscan.data.sources import index_folder
    from covidscan.export.onnx import export_run
    from covidscan.pipeline import train_run
    from covidscan.predict import load_scorer
    from covidscan.serve.predictor import load_bundle

    with pytest.raises(ConfigError, match="data.preprocess"):
        load_config(None, ["data.preprocess=sharpen"])
    run = tmp_path / "run"
    train_run(index_folder(tiny_phantom), load_config(None, TINY + ["data.preprocess=lung_crop+clahe", "train.epochs=1"]), run,
              show_progress=False, log=lambda m: None)
    assert json.loads((run / "model.json").read_text())["preprocess"] == "lung_crop+clahe"
    export_run(run, tmp_path / "bundle")
    paths = sorted(tiny_phantom.glob("*/*/*.png"))[:6]
    scorer, bundle = load_scorer(run), load_bundle(tmp_path / "bundle")
    expected = np.stack([prepare_image(read_image(p).pixels, 48, "lung_crop+clahe") for p in paths])
    assert np.array_equal(scorer.load_images([(str(p), None) for p in paths])[:, 0], expected)
    assert np.array_equal(np.stack([bundle.prepare(read_image(p).pixels) for p in paths]), expected)
    served = [r.probabilities["COVID"] for r in bundle.analyse([read_image(p).pixels for p in paths], heatmaps=False)]
    assert np.allclose(served, [p.probabilities["COVID"] for p in scorer.predict(list(paths))], atol=1e-4)
