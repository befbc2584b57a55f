"""Every seed backbone builds with covidscan's head, takes gray input, trains a step, exposes its CAM layer."""
from __future__ import annotations

import pytest
import torch

from covidscan.models.classifier import CovidClassifier, _get_module
from covidscan.models.registry import get_backbone, list_backbones
from covidscan.errors import ConfigError, WeightsError


@pytest.mark.parametrize("name,size", [("resnet50", 64), ("densenet201", 64), ("vgg16", 64), ("inception_v3", 96), ("efficientnet_lite2", 64),
                                       ("inception_resnet_v2", 96), ("efficientnet_b4", 64)])
def test_seed_backbone_trains_one_step_on_gray_input(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = CovidClassifier(name, num_classes=2, in_chans=1, weights="none")
    x, y = torch.rand(3, 1, size, size), torch.tensor([0, 1, 1])
    features = model.forward_features(x)
    assert features.ndim == 4 and features.shape[1] == model.num_features
    cam_module = _get_module(model.backbone, get_backbone(name).cam_layer)
    seen: list[torch.Size] = []
    handle = cam_module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    handle.remove()
    assert seen and seen[-1][1] == model.num_features  # the CAM layer is the head's input
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.head.weight)


def test_registry_lists_seed_backbones_with_their_sizes() -> None:
    sizes = {spec.name: spec.input_size for spec in list_backbones()}
    assert sizes["inception_v3"] == 299 and sizes["vgg16"] == 224 and sizes["efficientnet_lite0"] == 224
    assert sizes["inception_resnet_v2"] == 299 and sizes["efficientnet_b4"] == 380


def test_missing_weights_offline_name_the_options() -> None:
    with pytest.raises(WeightsError, match="model.weights"):
        CovidClassifier("resnet50", 2, weights="imagenet")


def test_unknown_backbone_suggests_a_name() -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        get_backbone("resnet5O")
