from __future__ import annotations

from pathlib import Path

import pytest

from covidscan.config import load_config, packaged_config
from covidscan.errors import ConfigError


def test_defaults_follow_the_seed_study() -> None:
    cfg = load_config()
    assert (cfg.train.batch_size, cfg.model.dropout, cfg.model.weights) == (64, 0.25, "imagenet")


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  dropout: 0.5\n")
    cfg = load_config(path, ["train.epochs=7", "train.augment=false", "train.lr=3e-4"])
    assert cfg.train.epochs == 7 and cfg.model.dropout == 0.5 and cfg.train.augment is False
    assert cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochz=3", "did you mean train.epochs"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.epochs=many", "expected int"),
        ("model.transfer=medium", "model.transfer must be one of"),
        ("epochs=3", "expected section.key=value"),
    ],
)
def test_bad_overrides_are_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(path)


def test_packaged_demo_config_loads() -> None:
    assert load_config(packaged_config("demo")).data.image_size == 128
