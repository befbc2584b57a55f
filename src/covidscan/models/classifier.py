"""Backbone -> global average pool -> dropout -> linear.

With this head, the class activation map of the last feature map equals
Grad-CAM exactly, which lets the torch-free service compute heat maps.
"""
from __future__ import annotations

from typing import Literal

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from covidscan.models.registry import BackboneSpec, get_backbone
from covidscan.models.weights import load_imagenet_weights

TransferMode = Literal["shallow", "deep", "fine"]
TRANSFER_MODES: tuple[str, ...] = ("shallow", "deep", "fine")


def _get_module(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _adapt_first_conv(backbone: nn.Module, in_chans: int) -> None:
    """Sum the first convolution's RGB filters for gray input (timm's adapt_input_conv)."""
    if in_chans == 3:
        return
    conv_path = backbone.pretrained_cfg["first_conv"]
    conv = _get_module(backbone, conv_path)
    conv.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.detach()))
    conv.in_channels = in_chans


def build_imagenet_model(spec: BackboneSpec, weights: str = "imagenet") -> tuple[nn.Module, str]:
    """The timm model with its ImageNet head, weights loaded; used for the weights check too."""
    model = timm.create_model(spec.timm_name, pretrained=False)
    if spec.bn_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = spec.bn_eps
    return model, load_imagenet_weights(spec, model, weights)


def head_forward(dropout: nn.Module, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Global average pool -> dropout -> linear: one score per network output."""
    return head(dropout(features.mean(dim=(2, 3))))


def compose_logits(output_logits: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Class logits from sub-class logits: log-sum-exp over each class's sub-classes.

    softmax(class logits) equals the sub-class softmax summed per class (DeTraC's
    compose step), so probabilities, calibration, Grad-CAM and the exported
    graph all see classes. `membership` (C, K) is 1 where output k belongs to class c.
    """
    masked = output_logits.float().unsqueeze(1) + (membership - 1.0) * 1e9
    return torch.logsumexp(masked, dim=2)


class HeadPath(nn.Module):
    """The head alone, as a module: what DDP wraps while the backbone is frozen."""

    def __init__(self, dropout: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.dropout, self.head = dropout, head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return head_forward(self.dropout, self.head, features)


class CovidClassifier(nn.Module):
    """A timm backbone with covidscan's GAP-dropout-linear head."""

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        in_chans: int = 1,
        dropout: float = 0.25,
        weights: str = "imagenet",
        parents: tuple[int, ...] | None = None,
    ) -> None:
        """`num_classes` outputs; with `parents` (class index of each output; DeTraC) the outputs are sub-classes."""
        super().__init__()
        self.spec = get_backbone(backbone_name)
        backbone, self.weights_source = build_imagenet_model(self.spec, weights)
        backbone.reset_classifier(0, global_pool="")
        _adapt_first_conv(backbone, in_chans)
        self.backbone = backbone
        self.feature_map = nn.Identity()  # a named tap on the head's input, for CAMs of unregistered backbones
        self.in_chans = in_chans
        self.num_features = int(backbone.num_features)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_classes)
        self.frozen_backbone = False
        self.parents = tuple(parents) if parents is not None else tuple(range(num_classes))
        if len(self.parents) != num_classes:
            raise ValueError(f"{len(self.parents)} parents for {num_classes} outputs")
        self.decomposed = len(set(self.parents)) != num_classes
        membership = torch.zeros(len(set(self.parents)), num_classes)
        membership[torch.tensor(self.parents), torch.arange(num_classes)] = 1.0
        self.register_buffer("membership", membership, persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, h, w): the head's input and the CAM layer."""
        return self.feature_map(self.backbone.forward_features(x))

    def gate_layer_name(self) -> str:
        """The second-deepest feature stage (timm's feature_info): generic image statistics that
        fine-tuning changes little, which is what an out-of-distribution check needs."""
        info = getattr(self.backbone, "feature_info", None)
        modules = [entry["module"] for entry in info] if info else []
        return modules[-2] if len(modules) >= 2 else ""

    def cam_target_layer(self) -> nn.Module:
        """The registered Grad-CAM layer, or the head's input when none is registered."""
        return _get_module(self.backbone, self.spec.cam_layer) if self.spec.cam_layer else self.feature_map

    def compose(self, output_logits: torch.Tensor) -> torch.Tensor:
        """Class logits from output logits (unchanged unless the classes are decomposed)."""
        return compose_logits(output_logits, self.membership) if self.decomposed else output_logits

    def forward_head(self, features: torch.Tensor, composed: bool = True) -> torch.Tensor:
        return self.compose(head_forward(self.dropout, self.head, features)) if composed else head_forward(self.dropout, self.head, features)

    def forward(self, x: torch.Tensor, composed: bool = True) -> torch.Tensor:
        """Class logits; `composed=False`: one logit per output (sub-classes when decomposed), for training."""
        return self.forward_head(self.forward_features(x), composed)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, C): for clustering, t-SNE and the input gate."""
        return self.forward_features(x).mean(dim=(2, 3))

    def layer_groups(self) -> list[list[str]]:
        """Backbone parameter names in depth order (stem first), from timm's group matcher."""
        from timm.models import group_parameters

        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [list(names) for _, names in sorted(groups.items())]

    def set_trainable_groups(self, count: int) -> None:
        """Progressive unfreezing: only the `count` deepest layer groups of the backbone train."""
        if count <= 0:
            self.freeze_backbone(True)
            return
        self.freeze_backbone(False)
        groups = self.layer_groups()
        trainable = {name for names in groups[max(0, len(groups) - count) :] for name in names}
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad_(name in trainable)

    def freeze_backbone(self, frozen: bool) -> None:
        """Shallow transfer: train the head only, with the backbone's BatchNorm statistics fixed."""
        self.frozen_backbone = frozen
        self.backbone.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()

    def train(self, mode: bool = True) -> CovidClassifier:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self
