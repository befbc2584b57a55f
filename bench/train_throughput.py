"""Training throughput: the whole step (data + augmentation + forward/backward/step) vs the model alone.

Usage (on a GPU machine): .venv/bin/python bench/train_throughput.py [--backbones vgg16,resnet50,...] [--steps 30]

For each backbone at its registered input size, measures images/s of
  * model-only: random tensors already on the device, forward/backward/step;
  * full step: uint8 images held on the device, batched augmentation and
    normalisation, forward/backward/step (what `covidscan train` runs);
in fp32 and bf16 autocast, with channels_last on and off, and peak GPU memory.
Images come from ../shared/data/sarscov2-ct when present (resized once),
else from the synthetic phantom. Weights: random ('none'); speed does not
depend on them. Runs on CPU too (slowly), which is how it is tested.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402

from covidscan.data.transforms import AugmentConfig, Normaliser, augment, to_float
from covidscan.models.classifier import CovidClassifier
from covidscan.models.registry import get_backbone

SEED_BACKBONES = "vgg16,inception_v3,densenet201,resnet50,efficientnet_lite0"


def load_images(size: int, n: int, data: Path) -> np.ndarray:
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset
    from covidscan.data.public_sets import index_source
    from covidscan.data.manifest import image_refs
    from covidscan.pipeline import load_image_array

    root = data / "sarscov2-ct"
    if not root.is_dir():
        import tempfile

        root = generate_phantom_dataset(Path(tempfile.mkdtemp()), PhantomSpec(patients_per_class=8, slices_per_patient=4, image_size=128))
    frame = index_source(root).head(n)
    return load_image_array(image_refs(frame), size, show=False)


def timed(step, steps: int, device: torch.device, warm_up: list[float] | None = None) -> float:  # type: ignore[no-untyped-def]
    """Seconds for `steps` steps after 3 warm-up steps (whose seconds go to `warm_up`, e.g. torch.compile's cost)."""
    started = time.perf_counter()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if warm_up is not None:
        warm_up.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(
    name: str, images_np: np.ndarray, batch: int, steps: int, dtype: str, channels_last: bool, device: torch.device,
    compiled: bool = False,
) -> dict[str, object]:
    spec = get_backbone(name)
    model = CovidClassifier(name, 2, 1, weights="none").to(device)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    forward = torch.compile(model) if compiled else model
    normaliser = Normaliser.for_backbone(spec)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    images = torch.from_numpy(images_np).to(device)
    labels = torch.randint(0, 2, (len(images),), device=device)
    generator = torch.Generator().manual_seed(0)
    fixed = torch.randn(batch, 1, images.shape[-1], images.shape[-1], device=device).to(memory_format=memory)
    fixed_y = torch.randint(0, 2, (batch,), device=device)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def model_only() -> None:
        train_step(fixed, fixed_y)

    def full_step() -> None:
        index = torch.randint(0, len(images), (batch,), generator=generator).to(device)
        x = normaliser(augment(to_float(images[index]), generator, AugmentConfig())).contiguous(memory_format=memory)
        train_step(x, labels[index])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_up: list[float] = []
    model_seconds = timed(model_only, steps, device, warm_up)
    full_seconds = timed(full_step, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "backbone": name, "px": images.shape[-1], "dtype": dtype, "channels_last": channels_last,
        "model-only img/s": round(batch * steps / model_seconds, 1), "full step img/s": round(batch * steps / full_seconds, 1),
        "full/model": f"{model_seconds / full_seconds:.0%}", "peak GiB": round(peak, 2),
        "compiled": compiled, "warm-up s": round(warm_up[0], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", default=SEED_BACKBONES)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=2481)
    parser.add_argument("--size", type=int, default=0, help="override every backbone's input size (CPU smoke runs)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    rows = []
    cache: dict[int, np.ndarray] = {}
    for name in args.backbones.split(","):
        size = args.size or get_backbone(name).input_size
        if size not in cache:
            cache[size] = load_images(size, args.images, args.data.resolve())
        for dtype in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
            for channels_last in (False, True) if device.type == "cuda" else (False,):
                row = measure(name, cache[size], args.batch, args.steps, dtype, channels_last, device)
                rows.append(row)
                print(row, flush=True)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
