"""BYOL self-supervised pre-training (Grill et al. 2020, "Bootstrap your own latent").

Online network = backbone + projector + predictor; target = EMA of backbone + projector (timm ModelEmaV3),
tau on a cosine schedule from `ema_tau` to 1 over the run's *real* number of optimizer steps (S0 set it
against a 500-epoch cap its runs never reached, so tau stayed ≈0.996). Loss: S0's
symmetric negative cosine similarity, 0.5·(l(p0, z1) + l(p1, z0)), l = −cos. Collapse is watched
through `z_std`, the per-dimension std of L2-normalised projections (solo-learn): ≈1/√out_dim when
healthy, → 0 on collapse. Pre-trains on the training split only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from ..config import TrialConfig
from ..data.loader import PreparedData, make_loader
from ..models.heads import mlp_head, nested_no_weight_decay
from .base import PhaseContext, SslPhase
from .common import (
    build_optimizer,
    build_scheduler,
    compiled,
    current_lr,
    distributed,
    eval_loss,
    optimizer_steps_per_epoch,
    step_scheduler,
)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−cos(p, sg(z)), averaged over the batch; the target branch gets no gradient."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def byol_loss(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss: each view's prediction regresses the other view's target projection."""
    return 0.5 * (negative_cosine(p0, z1) + negative_cosine(p1, z0))


def ema_tau(step: int, total_steps: int, base: float) -> float:
    """tau_k = 1 − (1 − base)·(cos(πk/K) + 1)/2: base at k = 0, exactly 1 at k = K (BYOL §3.2)."""
    k = min(step, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


def projection_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse metric: mean over dimensions of the batch std of L2-normalised projections (on z's device: read
    once per epoch, not at every step)."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class OnlineModules(nn.ModuleList):
    """What BYOL's optimizer trains (online encoder + predictor, not the EMA target), with the full names of
    the parameters kept out of weight decay for timm's `create_optimizer_v2`."""

    def no_weight_decay(self) -> set[str]:
        return nested_no_weight_decay(self)


class Byol(nn.Module):
    """Online encoder (backbone + projector) and predictor, with an EMA target encoder."""

    def __init__(self, backbone: nn.Module, num_features: int, hidden_dim: int, out_dim: int, tau: float):
        super().__init__()
        self.online = nn.Sequential(backbone, mlp_head(num_features, hidden_dim, out_dim))
        self.predictor = mlp_head(out_dim, hidden_dim, out_dim)
        self.target = ModelEmaV3(self.online, decay=tau)
        self.target.module.train()  # target BN uses batch statistics, as in BYOL
        self.target.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        return self.online[0]

    def forward(self, v0: torch.Tensor, v1: torch.Tensor):
        z0, z1 = self.online(v0), self.online(v1)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        with torch.no_grad():
            t0, t1 = self.target.module(v0), self.target.module(v1)
        return byol_loss(p0, p1, t0, t1), z0

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        self.target.apply_update_(self.online, tau)


class ByolPhase(SslPhase):
    """Pre-train `backbone` in place with BYOL for `byol.epochs`; `run()` returns the phase summary."""

    name, watched = "byol", ("byol_val_loss",)

    def __init__(self, cfg: TrialConfig, data: PreparedData, context: PhaseContext, backbone: nn.Module,
                 num_features: int):
        super().__init__(cfg, data, context)
        self.backbone, self.num_features = backbone, num_features

    def build(self) -> None:
        bc, context = self.cfg.byol, self.context
        self.epochs, self.accum_steps = bc.epochs, bc.accum_steps
        self.model = self.precision.module(Byol(self.backbone, self.num_features, bc.hidden_dim, bc.out_dim,
                                                bc.ema_tau))
        self.trained = compiled(distributed(self.model, context.world_size, self.device), self.cfg)
        self.make_views()
        train_set = self.data.dataset("train", with_unlabelled=not bc.labelled_only)
        val_set = self.data.dataset("val")
        self.loader = make_loader(train_set, bc.batch_size, shuffle=True, drop_last=True, seed=self.cfg.seed,
                                  rank=context.rank, world_size=context.world_size, key="byol.batch_size",
                                  device=self.device, data=self.cfg.data)
        self.val_loader = make_loader(val_set, min(bc.batch_size, len(val_set)), shuffle=False,
                                      drop_last=len(val_set) > 1, device=self.device, data=self.cfg.data)
        self.params = [p for n, p in self.model.named_parameters() if not n.startswith("target.") and p.requires_grad]
        self.optimizers = [build_optimizer(OnlineModules([self.model.online, self.model.predictor]), bc.optimizer)]
        self.schedulers = [build_scheduler(self.optimizers[0], bc.scheduler, mode="min")]
        self.total_steps = bc.epochs * optimizer_steps_per_epoch(len(self.loader), bc.accum_steps)
        self.step, self.tau, self.z_std = 0, bc.ema_tau, 0.0

    def restore(self, resume: dict) -> None:
        super().restore(resume)
        self.step, self.tau = resume["step"], resume["tau"]

    def two_views(self, x: torch.Tensor):
        """Two independent per-image draws of the augmentation, on the device."""
        x = x.to(self.device, non_blocking=True)
        return self.precision.images(self.augment(x)), self.precision.images(self.augment(x))

    def micro_step(self, batch) -> torch.Tensor:
        with self.precision.autocast():
            loss, z0 = self.trained(*self.two_views(batch[0]))
        self.z_std = projection_std(z0)
        return loss.float()

    def after_step(self) -> None:
        self.step += 1
        self.tau = ema_tau(self.step, self.total_steps, self.cfg.byol.ema_tau)
        self.model.update_target(self.tau)

    def evaluate(self, epoch: int, train_loss: float) -> dict:
        # the BYOL loss on augmented validation images
        val_loss = eval_loss(self.model, self.val_loader, lambda x: self.model(*self.two_views(x))[0], self.precision)
        return {"byol_loss": train_loss, "byol_val_loss": val_loss, "z_std": float(self.z_std), "ema_tau": self.tau,
                "lr": current_lr(self.optimizers[0]),
                **self.monitor.measure(epoch, [self.model.backbone], self.eval_views, self.precision)}

    def after_evaluate(self, metrics: dict) -> None:
        bc = self.cfg.byol
        self.history.append(metrics)
        self.monitor.check(metrics, bc.out_dim)
        step_scheduler(self.schedulers[0], metrics["epoch"], {"val_loss": metrics["byol_val_loss"], **metrics},
                       bc.scheduler)

    def extra_state(self) -> dict:
        return {"step": self.step, "tau": self.tau}

    def finish(self) -> dict:
        return {"history": self.history, "steps": self.step, "total_steps": self.total_steps, "final_tau": self.tau,
                "batch_size": self.cfg.byol.batch_size}
