"""Without this test passing, 'pretrained' means nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from covidscan.models.classifier import build_imagenet_model
from covidscan.models.registry import get_backbone


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_lite_weights_see_a_cat(name: str) -> None:
    spec = get_backbone(name)
    model, source = build_imagenet_model(spec, "imagenet")
    assert source.startswith("packaged:")
    model.eval()
    image = Image.fromarray(data.chelsea()).resize((spec.input_size, spec.input_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"chelsea classified as ImageNet class {top}"
    assert float(probs[281:286].sum()) > 0.6  # the cat classes together are confident (random weights: ~0.005)


def test_random_weights_do_not_see_a_cat_confidently() -> None:
    """Guards the test above: it must depend on the loaded weights."""
    spec = get_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    model, source = build_imagenet_model(spec, "none")
    assert source.startswith("none")
    model.eval()
    x = torch.from_numpy(np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    assert float(probs[281:286].sum()) < 0.1
