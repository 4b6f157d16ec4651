"""Phases: optional SSL pre-training (BYOL or CASS), then supervised fine-tuning — plain PyTorch.

`run_phases` is one trial: the one-run CLI calls it directly; the Ray Train worker calls it per rank.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import yaml

from ..config import ConfigError, TrialConfig
from ..data.loader import PreparedData, prepare
from ..models import create_backbone, uses_selective_scan
from ..models.scan import resolve_backend
from .base import PhaseContext
from .byol import ByolPhase
from .cass import CassPhase, build_cass
from .common import Report, no_report, resolve_device, reuse_freed_memory, seed_everything
from .ssl_store import ssl_phase
from .supervised import SupervisedPhase, resolve_loss


def fine_tuned_backbones(cfg: TrialConfig, pretrained: bool = True):
    """(backbone(s), feature width(s), name, CASS model or None) of what the fine-tune trains: the configured
    backbone, or a CASS arm (both arms as a list), pre-trained in place by CASS. `pretrained=False`: no
    pretrained weights are loaded (a checkpoint will overwrite them, as in predict)."""
    if not cfg.cass.enabled:
        backbone, width = create_backbone(cfg.model.backbone, cfg.model.pretrained if pretrained else False,
                                          cfg.model.in_chans, cfg.augment.image_size,
                                          grad_checkpointing=cfg.model.grad_checkpointing,
                                          scan_backend=cfg.model.scan_backend, ema=cfg.model.pretrained_ema)
        return backbone, width, cfg.model.backbone, None
    cass = build_cass(cfg, pretrained)
    keys = ("cnn", "transformer") if cfg.cass.finetune == "both" else (cfg.cass.finetune,)
    arms = [getattr(cass, k) for k in keys]
    name = "+".join(getattr(cfg.cass, k) for k in keys)
    if len(arms) == 1:
        return arms[0].backbone, arms[0].num_features, name, cass
    return [a.backbone for a in arms], [a.num_features for a in arms], name, cass


def resolve_scan_backend(cfg: TrialConfig, device) -> str:
    """The selective-scan backend the trial's SSM backbones run on `device` ('none' when it has none): `auto`
    resolved (scan.resolve_backend; a CUDA model that falls back to torch is warned about) and written back to
    `cfg.model.scan_backend`, so the trial's config and record say what ran. A backend that cannot run there is
    a ConfigError."""
    names = (cfg.cass.cnn, cfg.cass.transformer) if cfg.cass.enabled else (cfg.model.backbone,)
    if not any(uses_selective_scan(name) for name in names):
        return "none"
    try:
        cfg.model.scan_backend = resolve_backend(cfg.model.scan_backend, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg.model.scan_backend


def run_phases(cfg: TrialConfig, run_dir: str | Path, report: Report = no_report, data: PreparedData | None = None,
               rank: int = 0, world_size: int = 1, checkpoints: bool = False, resume: dict | None = None,
               ssl_start: dict | None = None, after_ssl=None) -> dict:
    """Run one trial config end to end; writes config.yaml, summary.json, best.pt and predictions.

    `checkpoints`: every epoch, hand `report` a directory with the full state; `resume`: a state read
    back from one (`common.load_state`) — the run continues from the epoch after it. `ssl_start`: a stored SSL
    phase (`ssl_store`: {"states", "meta", "from"}) the fine-tune starts from instead of pre-training; `after_ssl(
    backbones, ssl_summary)`: called on rank 0 once the SSL phase has run (the trial keeps it in the store)."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    seed_everything(cfg.seed, cfg.deterministic)
    # every bad-input error surfaces here, before any compute and before the run dir exists
    device = resolve_device(cfg.device)
    scan_backend = resolve_scan_backend(cfg, device)
    backbone, num_features, fine_tuned, cass = fine_tuned_backbones(cfg)
    data = data or prepare(cfg.data)
    resolve_loss(data.index.task, cfg.supervised.loss)
    if device.type == "cpu":
        reuse_freed_memory()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    summary: dict = {"backbone": fine_tuned, "task": data.index.task, "classes": list(data.index.classes),
                     "untrained_labels": data.index.untrained(),
                     "split_sizes": data.index.frame["split"].value_counts().to_dict(), "device": str(device),
                     "scan_backend": scan_backend}
    resume_phase = resume["phase"] if resume else None
    context = PhaseContext(device, run_dir, report, rank, world_size, checkpoints)
    ssl = ssl_phase(cfg)
    trained = list(backbone) if isinstance(backbone, (list, tuple)) else [backbone]  # what the fine-tune trains
    if ssl_start is not None and resume_phase != "supervised":  # pre-trained before, by this or another trial
        for module, state in zip(trained, ssl_start["states"]):
            module.load_state_dict(state)
        summary["ssl_from"] = ssl_start["from"]
        if ssl:
            summary[ssl] = ssl_start["meta"].get("summary")
    elif ssl and resume_phase != "supervised":
        ssl_context = dataclasses.replace(context, resume=resume if resume_phase == ssl else None)
        if ssl == "byol":
            summary[ssl] = ByolPhase(cfg, data, ssl_context, backbone, num_features).run()
        else:
            summary[ssl] = CassPhase(cfg, data, ssl_context, cass).run()
        if after_ssl is not None and rank == 0:
            after_ssl(trained, summary[ssl])
    elif resume_phase == "supervised" and resume.get("ssl") is not None:
        summary[ssl] = resume["ssl"]  # pre-trained before the interruption; its weights are in the state
    fine_tune = dataclasses.replace(context, resume=resume if resume_phase == "supervised" else None)
    carry = {"ssl": summary.get(ssl)} if ssl else None
    summary["supervised"] = SupervisedPhase(cfg, data, fine_tune, backbone, num_features, carry).run()
    summary["val"] = summary["supervised"]["val"]
    summary["test"] = summary["supervised"]["test"]
    summary["wall_time_s"] = time.perf_counter() - start
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


__all__ = ["run_phases", "fine_tuned_backbones", "resolve_scan_backend"]
