"""CASS: cross-architecture self-supervision (Singh et al. 2022, arXiv:2206.04170), as in S1 (CASS on brain-tumour
MRI, ISIC and autoimmune images).

A CNN arm and a transformer arm see the same augmented batch; each output is projected to a shared width
and the loss is 2 − 2·cos between the two L2-normalised outputs. There is no stop-gradient, EMA or
predictor: both arms learn, each with its own optimizer and schedule, gradients zeroed every step (S1 never
zeroed them). Optional stochastic weight averaging is real here (torch.optim.swa_utils: averaged weights,
SWA LR, BN statistics recomputed); S1's SWA wrapper never averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from ..config import TrialConfig
from ..data.loader import PreparedData, make_loader
from ..models import create_backbone
from ..models.heads import nested_no_weight_decay
from .base import PhaseContext, SslPhase
from .common import (
    build_optimizer,
    build_scheduler,
    compiled,
    current_lr,
    distributed,
    eval_loss,
    plain_state,
    step_scheduler,
)


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


class CassPhase(SslPhase):
    """Pre-train both arms of `model` in place for `cass.epochs`; `run()` returns the phase summary."""

    name, watched = "cass", ("cass_val_loss",)

    def __init__(self, cfg: TrialConfig, data: PreparedData, context: PhaseContext, model: Cass):
        super().__init__(cfg, data, context)
        self.model = model

    def build(self) -> None:
        cc, context = self.cfg.cass, self.context
        self.epochs, self.accum_steps = cc.epochs, cc.accum_steps
        self.precision.module(self.model)
        self.arms = (self.model.cnn, self.model.transformer)
        self.trained = compiled(distributed(self.model, context.world_size, self.device), self.cfg)
        self.make_views()
        train_set = self.data.dataset("train", with_unlabelled=not cc.labelled_only)
        self.loader = make_loader(train_set, cc.batch_size, shuffle=True, drop_last=True, seed=self.cfg.seed,
                                  rank=context.rank, world_size=context.world_size, key="cass.batch_size",
                                  device=self.device, data=self.cfg.data)
        self.val_loader = make_loader(self.data.dataset("val"), cc.batch_size, shuffle=False, device=self.device,
                                      data=self.cfg.data)
        self.optimizers = [build_optimizer(arm, cc.optimizer) for arm in self.arms]
        self.schedulers = [build_scheduler(opt, cc.scheduler, mode="min") for opt in self.optimizers]
        self.averaged = [AveragedModel(arm) for arm in self.arms] if cc.swa else []
        self.swa_schedulers = [SWALR(opt, swa_lr=cc.swa_lr) for opt in self.optimizers] if cc.swa else []
        self.swa_start = int(cc.swa_start * cc.epochs)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        arms = ("cnn", "transformer") if cc.finetune == "both" else (cc.finetune,)
        self.probed = [getattr(self.model, arm).backbone for arm in arms]  # what the fine-tune trains

    def restore(self, resume: dict) -> None:
        super().restore(resume)
        for avg, state in zip(self.averaged, resume["averaged"]):
            avg.load_state_dict(state)
        for swa_sched, state in zip(self.swa_schedulers, resume["swa_schedulers"]):
            swa_sched.load_state_dict(state)

    def micro_step(self, batch) -> torch.Tensor:
        x = self.precision.images(self.augment(batch[0].to(self.device, non_blocking=True)))  # one draw, both arms
        with self.precision.autocast():
            return self.trained(x).float()

    def evaluate(self, epoch: int, train_loss: float) -> dict:
        # the CASS loss on validation images' centre view
        def centre_loss(x: torch.Tensor) -> torch.Tensor:
            return self.model(self.precision.images(self.eval_views(x.to(self.device))[0]))

        val_loss = eval_loss(self.model, self.val_loader, centre_loss, self.precision)
        return {"cass_loss": train_loss, "cass_val_loss": val_loss, "lr": current_lr(self.optimizers[0]),
                **self.monitor.measure(epoch, self.probed, self.eval_views, self.precision)}

    def after_evaluate(self, metrics: dict) -> None:
        cc = self.cfg.cass
        if self.averaged and metrics["epoch"] > self.swa_start:
            for avg, arm, swa_sched in zip(self.averaged, self.arms, self.swa_schedulers):
                avg.update_parameters(arm)
                swa_sched.step()
        else:
            for sched in self.schedulers:
                step_scheduler(sched, metrics["epoch"], {"val_loss": metrics["cass_val_loss"], **metrics},
                               cc.scheduler)
        self.history.append(metrics)
        self.monitor.check(metrics)

    def extra_state(self) -> dict:
        return {"averaged": [avg.state_dict() for avg in self.averaged],
                "swa_schedulers": [plain_state(swa_sched) for swa_sched in self.swa_schedulers]}

    def finish(self) -> dict:
        swa_updates = int(self.averaged[0].n_averaged) if self.averaged else 0
        if swa_updates:  # the averaged weights become the arms, with BN statistics recomputed for them
            for avg, arm in zip(self.averaged, self.arms):
                update_bn((self.precision.images(self.augment(x.to(self.device))) for x, _ in self.loader), avg)
                arm.load_state_dict(avg.module.state_dict())
        return {"history": self.history, "batch_size": self.cfg.cass.batch_size, "swa_updates": swa_updates,
                "finetuned_arm": self.cfg.cass.finetune}
