"""Multi-process training under `torchrun`: process group, rank helpers, rank agreement check.

`torchrun --nproc_per_node N -m covidscan.cli train ...` sets WORLD_SIZE,
RANK and LOCAL_RANK; without them everything here is a no-op (one process).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def device_for(ctx: Dist, requested: str) -> torch.device:
    """The training device; a device that does not exist here is a config error, not a traceback."""
    from covidscan.errors import ConfigError

    try:
        device = torch.device(requested) if requested != "auto" else None
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={requested}: no CUDA GPU is available on this machine; use auto or cpu")
    if device is not None and device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={requested}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device is not None and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: unsupported device {requested!r}; use auto, cpu, cuda or cuda:N")
    if ctx.enabled and torch.cuda.is_available() and requested in ("auto", "cuda"):
        return torch.device("cuda", ctx.local_rank)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


def mean_across_ranks(ctx: Dist, value: float) -> float:
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ranks_agree(ctx: Dist, model: nn.Module) -> bool:
    """True when every rank holds bit-identical weights (always true for one process)."""
    if not ctx.enabled:
        return True
    digests: list[str | None] = [None] * ctx.world
    dist.all_gather_object(digests, weights_digest(model))
    return len(set(digests)) == 1


def wrap(ctx: Dist, module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` (its trainable parameters) when distributed."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
