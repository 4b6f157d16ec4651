"""CASS: cross-architecture self-supervision (Singh et al. 2022, arXiv:2206.04170), as in S1 (CASS on brain-tumour
MRI, ISIC and autoimmune images).

A CNN arm and a transformer arm see the same augmented batch; each output is projected to a shared width
and the loss is 2 − 2·cos between the two L2-normalised outputs. There is no stop-gradient, EMA or
predictor: both arms learn, each with its own optimizer and schedule, gradients zeroed every step (S1 never
zeroed them). Optional stochastic weight averaging is real here (torch.optim.swa_utils: averaged weights,
SWA LR, BN statistics recomputed); S1's SWA wrapper never averaged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from ..config import TrialConfig
from ..data.loader import PreparedData, make_loader, set_epoch
from ..models import create_backbone
from ..models.heads import nested_no_weight_decay
from .common import (
    Precision,
    Report,
    build_optimizer,
    build_scheduler,
    build_views,
    compiled,
    current_lr,
    distributed,
    epoch_loop,
    eval_loss,
    no_report,
    plain_state,
    restore_training,
    run_epoch,
    step_scheduler,
    training_state,
)
from .probe import Monitor


class CassArm(nn.Module):
    """A backbone (pooled features) and a linear projection to the shared output width."""

    def __init__(self, backbone: nn.Module, num_features: int, out_dim: int):
        super().__init__()
        self.backbone, self.num_features = backbone, num_features
        self.proj = nn.Linear(num_features, out_dim)

    def forward(self, x):
        return self.proj(self.backbone(x))

    def no_weight_decay(self) -> set[str]:
        return nested_no_weight_decay(self)  # each arm has its own optimizer (timm reads this)


def cass_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 − 2·cos(a, b), averaged over the batch (the BYOL regression loss between the two arms)."""
    return (2 - 2 * F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


class Cass(nn.Module):
    def __init__(self, cnn: CassArm, transformer: CassArm):
        super().__init__()
        self.cnn, self.transformer = cnn, transformer

    def forward(self, x):
        return cass_loss(self.cnn(x), self.transformer(x))


def build_cass(cfg: TrialConfig, pretrained: bool = True) -> Cass:
    """Both arms, built (and their names checked) before anything runs, each from its own default timm weights
    under `model.pretrained: true` (S1: `timm.create_model(..., pretrained=True)` for both)."""
    cc, arms = cfg.cass, []
    for key in ("cnn", "transformer"):
        backbone, width = create_backbone(getattr(cc, key), cfg.model.pretrained if pretrained else False,
                                          in_chans=cfg.model.in_chans,
                                          image_size=cfg.augment.image_size, key=f"cass.{key}",
                                          grad_checkpointing=cfg.model.grad_checkpointing,
                                          scan_backend=cfg.model.scan_backend, ema=cfg.model.pretrained_ema)
        arms.append(CassArm(backbone, width, cc.out_dim))
    return Cass(*arms)


def run_cass(cfg: TrialConfig, data: PreparedData, model: Cass, device: torch.device, run_dir: Path,
             report: Report = no_report, rank: int = 0, world_size: int = 1, checkpoints: bool = False,
             resume: dict | None = None) -> dict:
    """Pre-train both arms of `model` in place for `cass.epochs`; returns the phase summary."""
    cc = cfg.cass
    precision = Precision(cfg, device)
    precision.module(model)
    arms = (model.cnn, model.transformer)
    trained = compiled(distributed(model, world_size, device), cfg)
    scaler = precision.scaler()
    augment, eval_views = build_views(cfg, data, device)
    train_set = data.dataset("train", with_unlabelled=not cc.labelled_only)
    batch_size = cc.batch_size
    loader = make_loader(train_set, batch_size, shuffle=True, drop_last=True, seed=cfg.seed, rank=rank,
                         world_size=world_size, key="cass.batch_size", device=device, data=cfg.data)
    val_loader = make_loader(data.dataset("val"), batch_size, shuffle=False, device=device, data=cfg.data)
    optimizers = [build_optimizer(arm, cc.optimizer) for arm in arms]
    schedulers = [build_scheduler(opt, cc.scheduler, mode="min") for opt in optimizers]
    averaged = [AveragedModel(arm) for arm in arms] if cc.swa else []
    swa_schedulers = [SWALR(opt, swa_lr=cc.swa_lr) for opt in optimizers] if cc.swa else []
    swa_start = int(cc.swa_start * cc.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    history, start = [], 0
    if resume is not None:
        history, start = restore_training(resume, model, optimizers, schedulers)
        for avg, state in zip(averaged, resume["averaged"]):
            avg.load_state_dict(state)
        for swa_sched, state in zip(swa_schedulers, resume["swa_schedulers"]):
            swa_sched.load_state_dict(state)
    monitor = Monitor(cfg, data, "cass", cc.epochs, history)
    probed = [getattr(model, arm).backbone for arm in (("cnn", "transformer") if cc.finetune == "both"
                                                       else (cc.finetune,))]  # what the fine-tune trains

    def micro_step(batch):
        x = precision.images(augment(batch[0].to(device, non_blocking=True)))  # one draw, the same for both arms
        with precision.autocast():
            return trained(x).float()

    def train(epoch: int) -> float:
        model.train()
        set_epoch(loader, epoch)
        return run_epoch(loader, micro_step, optimizers, params, cc.accum_steps, model=trained, scaler=scaler)

    def evaluate(epoch: int, train_loss: float) -> dict:
        # the CASS loss on validation images' centre view
        val_loss = eval_loss(model, val_loader, lambda x: model(precision.images(eval_views(x.to(device))[0])),
                             precision)
        return {"cass_loss": train_loss, "cass_val_loss": val_loss, "lr": current_lr(optimizers[0]),
                **monitor.measure(epoch, probed, eval_views, precision)}

    def after_evaluate(metrics: dict) -> None:
        if averaged and metrics["epoch"] > swa_start:
            for avg, arm, swa_sched in zip(averaged, arms, swa_schedulers):
                avg.update_parameters(arm)
                swa_sched.step()
        else:
            for sched in schedulers:
                step_scheduler(sched, metrics["epoch"], {"val_loss": metrics["cass_val_loss"], **metrics},
                               cc.scheduler)
        history.append(metrics)
        monitor.check(metrics)

    epoch_loop("cass", start, cc.epochs, train=train, evaluate=evaluate, after_evaluate=after_evaluate,
               state=lambda done: training_state(
                   "cass", done, model, optimizers, schedulers, history,
                   averaged=[avg.state_dict() for avg in averaged],
                   swa_schedulers=[plain_state(swa_sched) for swa_sched in swa_schedulers]),
               report=report, run_dir=run_dir, checkpoints=checkpoints, rank=rank, world_size=world_size,
               watched=("cass_val_loss",))

    swa_updates = int(averaged[0].n_averaged) if averaged else 0
    if swa_updates:  # the averaged weights become the arms, with BN statistics recomputed for them
        for avg, arm in zip(averaged, arms):
            update_bn((precision.images(augment(x.to(device))) for x, _ in loader), avg)
            arm.load_state_dict(avg.module.state_dict())
    return {"history": history, "batch_size": batch_size, "swa_updates": swa_updates, "finetuned_arm": cc.finetune}
