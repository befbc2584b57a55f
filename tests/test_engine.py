from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.config import TrainConfig
from covidscan.data.transforms import AugmentConfig, Normaliser, augment
from covidscan.models.classifier import CovidClassifier
from covidscan.models.registry import get_backbone
from covidscan.data.io import load_image_array
from covidscan.data.manifest import image_refs
from covidscan.data.sources import index_folder
from covidscan.seed import seed_everything
from covidscan.train.engine import TensorData, fit


class Interrupted(Exception):
    pass


def _data(root: Path) -> tuple[TensorData, TensorData]:
    frame = index_folder(root)
    images = torch.from_numpy(load_image_array(image_refs(frame), 48, show=False))
    labels = torch.from_numpy((frame["label"] == "COVID").to_numpy().astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(frame)))
    images, labels = images[order], labels[order]
    return TensorData(images[:32], labels[:32]), TensorData(images[32:], labels[32:])


def _model() -> CovidClassifier:
    seed_everything(0)
    return CovidClassifier("efficientnet_lite0", 2, 1, 0.25, "imagenet")


@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "mixup+smoothing+cosine"])
def test_resume_after_interruption_repeats_the_uninterrupted_run(tiny_phantom: Path, tmp_path: Path, regularised: bool) -> None:
    """Also with mixup, label smoothing, stronger zoom and the cosine schedule: their random draws and the learning
    rate of the resumed epoch come out as in the uninterrupted run."""
    train, val = _data(tiny_phantom)
    cfg = TrainConfig(epochs=3, head_epochs=1, batch_size=8, patience=10, seed=3)
    if regularised:
        cfg = TrainConfig(epochs=3, head_epochs=1, batch_size=8, patience=10, seed=3, mixup=0.4, label_smoothing=0.1,
                          schedule="cosine", zoom=0.25, shift=0.1)
    normaliser = Normaliser.for_backbone(get_backbone("efficientnet_lite0"))

    whole = _model()
    result_whole = fit(whole, train, val, cfg, "fine", normaliser, tmp_path / "whole", log=lambda m: None)

    def stop_after_second_epoch(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise Interrupted

    broken = _model()
    with pytest.raises(Interrupted):
        fit(broken, train, val, cfg, "fine", normaliser, tmp_path / "resumed", log=stop_after_second_epoch)
    resumed = _model()  # a fresh process would rebuild the model from scratch
    result_resumed = fit(resumed, train, val, cfg, "fine", normaliser, tmp_path / "resumed", resume=True, log=lambda m: None)

    assert [r["val_loss"] for r in result_resumed["history"]] == [r["val_loss"] for r in result_whole["history"]]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cosine_schedule_decays_every_group_from_its_own_rate() -> None:
    from covidscan.train.engine import _set_learning_rate, learning_rate_factor

    factors = [learning_rate_factor("cosine", e, 10) for e in range(10)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:])) and 0 < factors[-1] < 0.03
    assert {learning_rate_factor("constant", e, 10) for e in range(10)} == {1.0}
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [weight], "lr": 1e-3}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4}])
    for factor in (0.5, 0.25):  # applied to the base rate, not compounded
        _set_learning_rate(optimizer, factor)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-4, 2.5e-5])


def test_mixup_label_smoothing_and_the_cosine_schedule_reach_the_training_loop(tiny_phantom: Path, tmp_path: Path) -> None:
    """Against the same run without them: mixup and label smoothing change the first epoch's loss; the cosine
    schedule leaves the first epoch (full rate) alone and changes the second (half rate)."""
    train, val = _data(tiny_phantom)

    def losses(name: str, **options: object) -> list[float]:
        cfg = TrainConfig(epochs=2, batch_size=8, patience=10, seed=0, **options)  # type: ignore[arg-type]
        result = fit(_model(), train, val, cfg, "shallow", Normaliser(0.5, 0.5), tmp_path / name, log=lambda m: None)
        return [r["train_loss"] for r in result["history"]]

    plain = losses("plain")
    assert plain == losses("again")  # the comparison is deterministic
    assert losses("mixup", mixup=0.4)[0] != plain[0] and losses("smoothing", label_smoothing=0.1)[0] != plain[0]
    cosine = losses("cosine", schedule="cosine")
    assert cosine[0] == plain[0] and cosine[1] != plain[1]


def test_mixup_blends_each_image_with_a_partner_and_returns_the_partner_targets() -> None:
    from covidscan.train.engine import _mix

    x, y = torch.rand(16, 1, 8, 8), torch.arange(16)
    mixed, partner, weight = _mix(x, y, 0.4, torch.Generator().manual_seed(5))
    again = _mix(x, y, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(mixed, again[0]) and 0.0 < weight < 1.0 and sorted(partner.tolist()) == list(range(16))
    assert torch.allclose(mixed, weight * x + (1 - weight) * x[partner]) and not torch.equal(partner, y)


def test_regulariser_settings_out_of_range_are_refused() -> None:
    from covidscan.config import load_config
    from covidscan.errors import ConfigError

    with pytest.raises(ConfigError, match="train.schedule must be one of constant, cosine"):
        load_config(None, ["train.schedule=step"])
    for bad in ("train.mixup=-1", "train.label_smoothing=1", "train.zoom=1.5", "train.shift=0.8"):
        with pytest.raises(ConfigError, match="train.zoom must be in"):
            load_config(None, [bad])


def test_shallow_mode_changes_only_the_head(tiny_phantom: Path, tmp_path: Path) -> None:
    train, val = _data(tiny_phantom)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, train, val, TrainConfig(epochs=1, batch_size=8, seed=0), "shallow", Normaliser(0.5, 0.5), tmp_path, log=lambda m: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_augment_is_seeded_and_keeps_range() -> None:
    x = torch.rand(4, 1, 32, 32)
    a = augment(x, torch.Generator().manual_seed(1), AugmentConfig())
    b = augment(x, torch.Generator().manual_seed(1), AugmentConfig())
    c = augment(x, torch.Generator().manual_seed(2), AugmentConfig())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_fine_mode_unfreezes_deepest_groups_first_with_decaying_learning_rates(tiny_phantom: Path, tmp_path: Path) -> None:
    from covidscan.train.engine import _make_optimizer, _trainable_groups

    model = _model()
    groups = model.layer_groups()
    cfg = TrainConfig(head_epochs=2, unfreeze_epochs=4, lr=1e-3, backbone_lr_scale=0.1, layer_decay=0.5)
    counts = [_trainable_groups("fine", e, cfg, len(groups)) for e in range(8)]
    assert counts[:2] == [0, 0] and counts[-1] == len(groups) and counts == sorted(counts) and 0 < counts[2] < len(groups)
    model.set_trainable_groups(2)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-1]) | set(groups[-2])
    lrs = [g["lr"] for g in _make_optimizer(model, cfg, "fine").param_groups]
    assert lrs[-1] == 1e-3 and lrs[-2] == pytest.approx(1e-4) and lrs[-3] == pytest.approx(5e-5) and lrs[0] < lrs[1]
