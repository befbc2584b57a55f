"""CPU training speed: the whole step (augmentation included) by layout, precision, torch.compile and threads.

Usage: .venv/bin/python bench/train_cpu.py [--backbones efficientnet_lite0,...] [--size 128] [--batch 32] [--steps 8]

For each backbone at the recipe's size (configs/sarscov2-cluster.yaml: 128 px,
batch 32), images/s of one full training step (uint8 images, batched
augmentation, normalisation, forward, backward, Adam step) with NCHW or
channels-last layout, fp32 or bf16 autocast, eager or torch.compile, on 1 or 2
threads; and whether compile pays back its warm-up within a 10-epoch run of
1,488 images. Images: ../shared/data/sarscov2-ct when present, else the phantom.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _table import markdown_table  # noqa: E402
from train_throughput import load_images, measure  # noqa: E402

RECIPE_IMAGES_PER_RUN = 1488 * 10  # configs/sarscov2-cluster.yaml: training images x epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes of warm-up per backbone)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args()
    device = torch.device("cpu")
    images = load_images(args.size, 512, args.data.resolve())
    rows = []
    for name in args.backbones.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for compiled in (False, True) if args.compile else (False,):
                for channels_last in (False, True):
                    for dtype in ("fp32", "bf16"):
                        row = measure(name, images, args.batch, args.steps, dtype, channels_last, device, compiled)
                        full = float(row["full step img/s"])  # type: ignore[arg-type]
                        row = {"backbone": name, "px": args.size, "threads": threads, "layout": "channels-last" if channels_last else "NCHW",
                               "precision": dtype, "compile": "yes" if compiled else "no", "full step img/s": full,
                               "model-only img/s": row["model-only img/s"], "warm-up s": row["warm-up s"],
                               "10-epoch recipe, training steps only (min)": round(RECIPE_IMAGES_PER_RUN / full / 60, 1)}
                        rows.append(row)
                        print(row, file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads at the end; bf16 = torch.autocast('cpu', torch.bfloat16)")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
