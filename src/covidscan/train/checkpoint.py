"""Checkpoints as one safetensors file: tensors plus a JSON state in its metadata.

No pickle anywhere, and one file per checkpoint, written atomically, so a
kill at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from covidscan import atomic
from covidscan.errors import CovidscanError

_MODEL = "model."
_OPTIM = "optim."


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{_OPTIM}{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write model (and optimizer) tensors with `state` as JSON metadata, atomically."""
    tensors = {_MODEL + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"state": json.dumps(state)}
    if optimizer is not None:
        optim_tensors, optim_meta = _optimizer_split(optimizer)
        tensors.update(optim_tensors)
        metadata["optimizer"] = json.dumps(optim_meta)
    return atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load tensors into `model`/`optimizer` (when given) and return the JSON state."""
    path = Path(path)
    if not path.is_file():
        raise CovidscanError(f"{path}: checkpoint does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise CovidscanError(f"{path}: not a readable checkpoint ({exc})") from None
    if model is not None:
        model_state = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
        model.load_state_dict(model_state)
    if optimizer is not None:
        if "optimizer" not in metadata:
            raise CovidscanError(f"{path}: checkpoint holds no optimizer state")
        meta = json.loads(metadata["optimizer"])
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            if key.startswith(_OPTIM):
                param_id, name = key[len(_OPTIM):].split(".", 1)
                state.setdefault(int(param_id), {})[name] = tensor
        for param_id, values in meta["scalars"].items():
            state.setdefault(int(param_id), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return json.loads(metadata.get("state", "{}"))
