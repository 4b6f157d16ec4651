"""The representation probe's cost as a share of a BYOL epoch, at S0's shapes on this CPU with a tiny model: one
BYOL epoch without the probe and one with it (`ssl.probe_every: 1`), in this one process, same data, same seed.

S0's shapes: 224-px crops from a 256-px cache, BYOL batch 256, projector 1024 → 256. S0's sizes set the ratios: on
ChestX-ray14 an SSL epoch reads ≈ 77,900 training images, and the probe reads the 8,650 validation images and
`ssl.probe_images` = 1,000 labelled training ones. Here the synthetic NIH data keep the validation share (10 % of
train_val patients, as NIH's official split here) and `probe_images` is scaled to the same share of train (1,000 /
77,900), so the measured share is the one S0's default settings would pay. The probe's work (a forward pass per
image and one similarity matrix) grows with the model as the epoch's does (two views, online forward and backward,
target forward), so a tiny model gives the share without a GPU.

    python scripts/bench_probe.py [--images 3000] [--backbone test_resnet] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tune_xray.config import build_config
from tune_xray.data.loader import prepare
from tune_xray.models import create_backbone
from tune_xray.phases.base import PhaseContext
from tune_xray.phases.byol import ByolPhase
from tune_xray.phases.common import seed_everything

NIH_TRAIN, NIH_VAL, PROBE_IMAGES = 77_900, 8_650, 1_000


def epoch_seconds(cfg, data, repeats: int) -> float:
    """The best of `repeats` timings of one BYOL epoch (its validation loss and, when on, its probe included)."""
    times = []
    for _ in range(repeats):
        seed_everything(cfg.seed)
        backbone, width = create_backbone(cfg.model.backbone, False, cfg.model.in_chans, cfg.augment.image_size)
        start = time.perf_counter()
        ByolPhase(cfg, data, PhaseContext(torch.device("cpu"), Path(tempfile.mkdtemp())), backbone, width).run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    base = {"data": {"synthetic_images": args.images, "synthetic_size": 256, "cache_size": 256},
            "augment": {"image_size": 224, "crop": "random"}, "model": {"backbone": args.backbone},
            "byol": {"enabled": True, "epochs": 1, "batch_size": 256, "hidden_dim": 1024, "out_dim": 256}}
    data = prepare(build_config(base, "bench").data)
    train, val = len(data.index.rows("train")), len(data.index.rows("val"))
    probe_images = max(10, round(PROBE_IMAGES * train / NIH_TRAIN))
    off = build_config({**base, "ssl": {"probe_every": 0}}, "bench")
    on = build_config({**base, "ssl": {"probe_every": 1, "probe_images": probe_images}}, "bench")
    print(f"{args.backbone}, {train:,} train / {val:,} val images (val/train {val / train:.3f}; NIH "
          f"{NIH_VAL / NIH_TRAIN:.3f}), probe on {probe_images} labelled train images (NIH: {PROBE_IMAGES:,} of "
          f"{NIH_TRAIN:,}); torch threads {torch.get_num_threads()}")
    without, with_probe = epoch_seconds(off, data, args.repeats), epoch_seconds(on, data, args.repeats)
    share = (with_probe - without) / without
    print(f"BYOL epoch without the probe   {without:7.2f} s")
    print(f"BYOL epoch with the probe      {with_probe:7.2f} s")
    print(f"probe share of an SSL epoch: {100 * share:.1f} % (goal ≤ 5 %; best of {args.repeats})")


if __name__ == "__main__":
    main()
