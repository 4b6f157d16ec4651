"""Input pipeline throughput: S0's per-sample PIL pipeline vs tune_xray's cache + on-device kornia.

Both run in this one process on the same synthetic 1024² NIH-format PNGs and produce the same thing: a
normalised 3×224×224 batch with S0's augmentations (crop 224 from 256, hflip, rotation ±10°, brightness and
contrast 0.8–1.2, random erasing ×3).
- S0: DataLoader over files; per sample PIL decode → RGB → Resize 256 → torchvision transforms.
- ours: the uint8 memmap cache at 256² (built once; its one-off build time is printed separately)
  → whole-batch gather → TrainAugment on the batch (here the CPU).
Both run with the allocator setting that training uses on CPU (`reuse_freed_memory`).

    python scripts/bench_data.py [--images 256] [--batch 64] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tune_xray.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, normalization
from tune_xray.config import AugmentConfig
from tune_xray.data.cache import build_cache
from tune_xray.data.loader import CachedBatches, make_loader
from tune_xray.data.synthetic import generate
from tune_xray.phases.common import reuse_freed_memory

OURS = "ours: cache + on-device augmentation (CPU)"
S0_AUG = AugmentConfig(image_size=224, crop="random", hflip=0.5, rotation=10, brightness=(0.8, 1.2),
                       contrast=(0.8, 1.2), erasing=3, erasing_p=0.5, erasing_scale=(0.02, 0.1))


class S0Dataset(Dataset):
    """S0's torchvision pipeline, one PNG at a time (S0's 'Train aug' and its augmentation ablation)."""

    def __init__(self, paths):
        self.paths = paths
        erase = [T.RandomErasing(p=0.5, scale=(0.02, 0.1)) for _ in range(3)]
        self.transform = T.Compose([
            T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip(), T.RandomRotation(10),
            T.ColorJitter(brightness=(0.8, 1.2), contrast=(0.8, 1.2)), T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD), *erase])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), 0


def rate(run, n_images: int, min_seconds: float = 3.0) -> float:
    """Images/s of `run()` (which processes n_images), repeated until min_seconds have passed."""
    run()  # warm-up: worker start, allocator, kornia parameter generators
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        run()
        done += n_images
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1],
                        help="DataLoader workers for S0's pipeline (0 = in-process, one core)")
    parser.add_argument("--data", help="existing synthetic 1024² dataset (default: generate into a temp dir)")
    args = parser.parse_args()

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp()) / "nih1024"
    if not (root / "images").is_dir():
        t = time.perf_counter()
        generate(root, args.images, 1024, seed=0)
        print(f"generated {args.images} synthetic 1024² PNGs in {time.perf_counter() - t:.1f} s")
    paths = sorted(str(p) for p in (root / "images").iterdir())[: args.images]
    torch.manual_seed(0)
    reuse_freed_memory()  # before both pipelines (DataLoader workers fork after this): same allocator for each
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, batch {args.batch}, {len(paths)} images")

    results = {}
    for w in args.workers:
        loader = DataLoader(S0Dataset(paths), batch_size=args.batch, num_workers=w, persistent_workers=w > 0)
        results[f"S0 PIL per-sample, {w} workers"] = rate(lambda: [b for b in loader], len(paths))

    t = time.perf_counter()
    cache = build_cache(paths, 256, 1, Path(tempfile.mkdtemp()))
    built = len(paths) / (time.perf_counter() - t)
    print(f"one-off cache build (decode + resize 256, uint8 memmap): {built:.0f} img/s")
    dataset = CachedBatches(cache, torch.arange(len(paths)).numpy(), torch.zeros(len(paths)).numpy())
    batches = make_loader(dataset, args.batch, shuffle=True)
    augment = TrainAugment(S0_AUG, 256, 3, *normalization(S0_AUG, 3))

    def ours():
        for x, _ in batches:
            out = augment(x)
        return out

    assert ours().shape[1:] == (3, 224, 224)
    results[OURS] = rate(ours, len(paths))
    results["ours: cache gather only"] = rate(lambda: [b for b in batches], len(paths))

    base = max(v for k, v in results.items() if k.startswith("S0"))
    for name, r in results.items():
        print(f"{name:45s} {r:8.0f} img/s")
    ours_rate = results[OURS]
    for name, r in results.items():
        if name.startswith("S0"):
            print(f"ratio ours / {name}: {ours_rate / r:.1f}×")
    print(f"ratio ours / best S0: {ours_rate / base:.1f}×")


if __name__ == "__main__":
    main()
