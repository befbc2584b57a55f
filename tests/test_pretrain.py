"""Self-supervised pretraining: the loss it minimises, and a weights file that training loads as it was learnt."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.errors import DataError


def test_nt_xent_is_low_when_each_view_finds_its_partner_and_high_otherwise() -> None:
    from covidscan.models.pretrain import nt_xent

    z = torch.randn(16, 32)
    matched = nt_xent(z, z + 0.01 * torch.randn(16, 32), temperature=0.2)
    shuffled = nt_xent(z, z[torch.roll(torch.arange(16), 1)], temperature=0.2)
    assert float(matched) < 1.0 and float(shuffled) > float(matched) + 2.0


def test_pretrained_weights_file_loads_into_training_as_learnt(tmp_path: Path) -> None:
    """The backbone changes, the file is in the timm layout `model.weights=FILE` reads (RGB stem that sums back to the
    gray one), and a network built from it equals the pretrained one; too few images are refused with the data's name."""
    import json

    from covidscan.models.classifier import CovidClassifier
    from covidscan.models.pretrain import pretrain_backbone, pretrain_file, save_pretrained

    rng = np.random.default_rng(0)
    images = (rng.random((64, 1, 48, 48)) * 255).astype(np.uint8)
    with pytest.raises(DataError, match="hospital-a.*at least 64"):
        pretrain_file(images[:10], tmp_path / "few.safetensors", "efficientnet_lite0", 48, "hospital-a", log=lambda m: None)
    logged: list[str] = []
    path = pretrain_file(images, tmp_path / "ssl.safetensors", "efficientnet_lite0", 48, "hospital-a", epochs=1, batch_size=32,
                         log=logged.append)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["images"] == 64 and "no labels" in record["method"] and len(record["history"]) == 1
    assert any("pretrain epoch 1/1" in line for line in logged)

    imagenet = CovidClassifier("efficientnet_lite0", 2, 1, 0.0, "imagenet")
    loaded = CovidClassifier("efficientnet_lite0", 2, 1, 0.0, str(path))
    assert loaded.weights_source == "file:ssl.safetensors"
    changed = [k for k, v in loaded.backbone.state_dict().items() if not torch.equal(v, imagenet.backbone.state_dict()[k])]
    assert "conv_stem.weight" in changed and len(changed) > 20  # pretraining moved the backbone, stem included
    pretrained, _ = pretrain_backbone(images[:32], "efficientnet_lite0", epochs=1, batch_size=16, log=lambda m: None)
    reloaded = CovidClassifier("efficientnet_lite0", 2, 1, 0.0, str(save_pretrained(pretrained, "imagenet", tmp_path / "b.safetensors", {})))
    x = torch.randn(2, 1, 48, 48)
    pretrained.eval(), reloaded.eval()
    assert torch.allclose(pretrained.forward_features(x), reloaded.forward_features(x), atol=1e-5)  # the network as it was learnt
