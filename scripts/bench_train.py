"""Training throughput per backbone: the supervised step and the BYOL step, each with the uint8 cache resident
on the device (`data.device_cache: true`) and without it (a DataLoader over the memmap: pinned memory and
prefetching workers on CUDA), in this one process.

A step is the product's: gather a batch → kornia augmentation on the device → channels_last → autocast forward
(bf16 where the GPU has it) → backward → optimizer step (BYOL: two views and the EMA target update). Prints
img/s (BYOL: image pairs/s), the share of step time spent waiting for data (fetching the batch onto the device,
synchronised), the ratio device cache / loader, and on CUDA the peak GPU memory of the timed steps and which selective
scan an SSM backbone ran (model.scan_backend).

S0 on one H100 (as published): DenseNet-121 fine-tune ≈400 img/s at 224 px; MambaVision-T2 BYOL ≈520 pairs/s. The
goals: ≥ 6× those (DenseNet-121 ≥ 2,400 img/s; a 78.6k-image MambaVision-T2 BYOL epoch ≤ 25 s, ≥ 3,150 pairs/s)
with data wait < 5 %.

    python scripts/bench_train.py                                   # CPU: test_* models and resnet18
    python scripts/bench_train.py --device cuda                     # S0's eight backbones at 224 px
    python scripts/bench_train.py --device cuda --backbones densenet121,mambavision_t2 --steps 50
    python scripts/bench_train.py --device cuda --backbones vmamba_s --phases supervised --cache device --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from tune_xray.config import build_config
from tune_xray.data.loader import make_loader, prepare, set_epoch
from tune_xray.models import create_backbone
from tune_xray.phases import resolve_scan_backend
from tune_xray.phases.byol import Byol, OnlineModules
from tune_xray.phases.common import Precision, build_optimizer, build_views, reuse_freed_memory
from tune_xray.phases.supervised import classifier

S0_EIGHT = ("densenet121", "convnextv2_large", "swinv2_cr_small_ns_224", "coatnet_2_rw_224",
            "maxxvitv2_rmlp_base_rw_224", "vmamba_s", "mambavision_l", "mambavision_t2")
CPU_DEFAULT = ("test_resnet", "test_vit", "test_mambavision", "resnet18")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(loader):
    """Endless batches, a new shuffle each pass."""
    for epoch in itertools.count():
        set_epoch(loader, epoch)
        yield from loader


def measure(step, loader, device: torch.device, warmup: int, steps: int, batch: int) -> dict:
    """Time `steps` steps after `warmup`: data wait (the batch onto the device), the whole step, and on CUDA the
    peak memory allocated over the timed steps."""
    it = batches(loader)
    wait = total = 0.0
    for i in range(warmup + steps):
        start = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)
        fetched = time.perf_counter()
        step(x, y)
        sync(device)
        if i + 1 == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if i >= warmup:
            wait += fetched - start
            total += time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img/s": steps * batch / total, "wait": wait / total, "peak_gib": peak}


def supervised_step(cfg, data, device):
    precision = Precision(cfg, device)
    backbone, width = create_backbone(cfg.model.backbone, image_size=cfg.augment.image_size,
                                      grad_checkpointing=cfg.model.grad_checkpointing,
                                      scan_backend=cfg.model.scan_backend)
    model = precision.module(classifier(backbone, width, data.num_classes, 0.0, "multilabel"))
    if cfg.model.compile:
        model = torch.compile(model)
    augment, _ = build_views(cfg, data, device)
    optimizer = build_optimizer(model, cfg.supervised.optimizer)
    scaler, loss_fn = precision.scaler(), torch.nn.BCEWithLogitsLoss()

    def step(x, y):
        x = precision.images(augment(x))
        with precision.autocast():
            logits = model(x)
        scaler.scale(loss_fn(logits.float(), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def byol_step(cfg, data, device):
    precision = Precision(cfg, device)
    backbone, width = create_backbone(cfg.model.backbone, image_size=cfg.augment.image_size,
                                      grad_checkpointing=cfg.model.grad_checkpointing,
                                      scan_backend=cfg.model.scan_backend)
    model = precision.module(Byol(backbone, width, cfg.byol.hidden_dim, cfg.byol.out_dim, cfg.byol.ema_tau))
    trained = torch.compile(model) if cfg.model.compile else model
    augment, _ = build_views(cfg, data, device)
    optimizer = build_optimizer(OnlineModules([model.online, model.predictor]), cfg.byol.optimizer)
    scaler = precision.scaler()

    def step(x, _):
        with precision.autocast():
            loss, _ = trained(precision.images(augment(x)), precision.images(augment(x)))
        scaler.scale(loss.float()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(cfg.byol.ema_tau)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", help="comma-separated timm names (default: S0's eight on CUDA, "
                        f"{','.join(CPU_DEFAULT)} on CPU)")
    parser.add_argument("--size", type=int, help="image size (default 224 on CUDA, 96 on CPU)")
    parser.add_argument("--batch", type=int, help="supervised batch (default 128 on CUDA, 32 on CPU)")
    parser.add_argument("--byol-batch", type=int, help="BYOL batch (default 256 on CUDA, 32 on CPU)")
    parser.add_argument("--images", type=int, help="synthetic images (default 4000 on CUDA, 600 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--phases", default="supervised,byol")
    parser.add_argument("--cache", default="both", choices=["both", "device", "loader"],
                        help="the uint8 cache on the device, a DataLoader over the memmap, or both and their ratio")
    parser.add_argument("--cache-dir", help="where the synthetic images are cached (default: a new temp dir)")
    parser.add_argument("--scan-backend", default="auto", choices=["auto", "kernel", "triton", "torch"])
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        reuse_freed_memory()
    names = args.backbones.split(",") if args.backbones else list(S0_EIGHT if gpu else CPU_DEFAULT)
    size = args.size or (224 if gpu else 96)
    batch, byol_batch = args.batch or (128 if gpu else 32), args.byol_batch or (256 if gpu else 32)
    steps = args.steps or (30 if gpu else 5)
    cache_size = size * 256 // 224
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="bench_train-")) / "cache"

    def config(backbone: str, cache: bool):
        return build_config({
            "device": str(device), "amp": args.amp,
            "data": {"synthetic_images": args.images or (4000 if gpu else 600), "synthetic_size": cache_size,
                     "cache_size": cache_size, "cache_dir": str(cache_dir), "device_cache": cache},
            # S0's train view (crop from the 256/224 cache, hflip, rotation ±10°) and its BYOL recipe
            "augment": {"image_size": size, "hflip": 0.5, "rotation": 10},
            "model": {"backbone": backbone, "compile": args.compile, "scan_backend": args.scan_backend,
                      "grad_checkpointing": args.grad_checkpointing},
            "supervised": {"batch_size": batch, "optimizer": {"name": "adamw", "lr": 1e-4}},
            "byol": {"batch_size": byol_batch, "hidden_dim": 1024, "out_dim": 256},
        }, "bench_train")

    rows = []
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), {size} px, batch "
          f"{batch} (BYOL {byol_batch}), {steps} steps after {args.warmup}, amp {args.amp}"
          + (", compiled" if args.compile else "") + (", gradient checkpointing" if args.grad_checkpointing else ""))
    caches = {"both": (False, True), "device": (True,), "loader": (False,)}[args.cache]
    for name in names:
        scan = resolve_scan_backend(config(name, True), device)
        for phase in args.phases.split(","):
            result = {}
            for cache in caches:
                cfg = config(name, cache)
                data = prepare(cfg.data)
                builder, n = (supervised_step, batch) if phase == "supervised" else (byol_step, byol_batch)
                loader = make_loader(data.dataset("train"), n, shuffle=True, drop_last=True, device=device,
                                     data=cfg.data)
                result["device cache" if cache else "loader"] = measure(builder(cfg, data, device), loader, device,
                                                                        args.warmup, steps, n)
                if gpu:
                    torch.cuda.empty_cache()
            rows.append({"backbone": name, "phase": phase, "batch": n, "scan_backend": scan, **result})
            unit = "img/s" if phase == "supervised" else "pairs/s"
            cells = [f"{where} {r['img/s']:8.1f} {unit} (data wait {100 * r['wait']:4.1f} %"
                     + (f", peak {r['peak_gib']:.1f} GiB)" if r["peak_gib"] is not None else ")")
                     for where, r in result.items()]
            if len(result) == 2:
                cells.append(f"ratio {result['device cache']['img/s'] / result['loader']['img/s']:.2f}")
            print(f"{name:28s} {phase:10s} " + "   ".join(cells) + (f"   scan {scan}" if scan != "none" else ""),
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))

if __name__ == "__main__":
    main()
