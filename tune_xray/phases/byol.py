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
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from ..config import TrialConfig
from ..data.loader import PreparedData, make_loader, set_epoch
from ..models.heads import mlp_head, nested_no_weight_decay
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
    optimizer_steps_per_epoch,
    restore_training,
    run_epoch,
    step_scheduler,
    training_state,
)
from .probe import Monitor


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


def run_byol(cfg: TrialConfig, data: PreparedData, backbone: nn.Module, num_features: int,
             device: torch.device, run_dir: Path, report: Report = no_report, rank: int = 0,
             world_size: int = 1, checkpoints: bool = False, resume: dict | None = None) -> dict:
    """Pre-train `backbone` in place with BYOL for `byol.epochs`; returns the phase summary.

    `checkpoints`: hand a full-state checkpoint to `report` every epoch; `resume`: such a state."""
    bc = cfg.byol
    precision = Precision(cfg, device)
    model = precision.module(Byol(backbone, num_features, bc.hidden_dim, bc.out_dim, bc.ema_tau))
    trained = compiled(distributed(model, world_size, device), cfg)
    scaler = precision.scaler()
    augment, eval_views = build_views(cfg, data, device)
    train_set = data.dataset("train", with_unlabelled=not bc.labelled_only)
    val_set = data.dataset("val")
    batch_size = bc.batch_size
    loader = make_loader(train_set, batch_size, shuffle=True, drop_last=True, seed=cfg.seed, rank=rank,
                         world_size=world_size, key="byol.batch_size", device=device, data=cfg.data)
    val_loader = make_loader(val_set, min(batch_size, len(val_set)), shuffle=False, drop_last=len(val_set) > 1,
                             device=device, data=cfg.data)
    params = [p for n, p in model.named_parameters() if not n.startswith("target.") and p.requires_grad]
    optimizer = build_optimizer(OnlineModules([model.online, model.predictor]), bc.optimizer)
    scheduler = build_scheduler(optimizer, bc.scheduler, mode="min")
    total_steps = bc.epochs * optimizer_steps_per_epoch(len(loader), bc.accum_steps)
    state = {"step": 0, "tau": bc.ema_tau, "z_std": 0.0}
    history, start = [], 0
    if resume is not None:
        history, start = restore_training(resume, model, [optimizer], [scheduler])
        state.update(step=resume["step"], tau=resume["tau"])
    monitor = Monitor(cfg, data, "byol", bc.epochs, history)

    def views(x):
        x = x.to(device, non_blocking=True)
        return precision.images(augment(x)), precision.images(augment(x))  # two independent per-image draws

    def micro_step(batch):
        with precision.autocast():
            loss, z0 = trained(*views(batch[0]))
        state["z_std"] = projection_std(z0)
        return loss.float()

    def after_step():
        state["step"] += 1
        state["tau"] = ema_tau(state["step"], total_steps, bc.ema_tau)
        model.update_target(state["tau"])

    def train(epoch: int) -> float:
        model.train()
        set_epoch(loader, epoch)
        return run_epoch(loader, micro_step, [optimizer], params, bc.accum_steps, after_step=after_step, model=trained,
                         scaler=scaler)

    def evaluate(epoch: int, train_loss: float) -> dict:
        # the BYOL loss on augmented validation images
        val_loss = eval_loss(model, val_loader, lambda x: model(*views(x))[0], precision)
        return {"byol_loss": train_loss, "byol_val_loss": val_loss, "z_std": float(state["z_std"]),
                "ema_tau": state["tau"], "lr": current_lr(optimizer),
                **monitor.measure(epoch, [model.backbone], eval_views, precision)}

    def after_evaluate(metrics: dict) -> None:
        history.append(metrics)
        monitor.check(metrics, bc.out_dim)
        step_scheduler(scheduler, metrics["epoch"], {"val_loss": metrics["byol_val_loss"], **metrics}, bc.scheduler)

    epoch_loop("byol", start, bc.epochs, train=train, evaluate=evaluate, after_evaluate=after_evaluate,
               state=lambda done: training_state("byol", done, model, [optimizer], [scheduler], history,
                                                 step=state["step"], tau=state["tau"]),
               report=report, run_dir=run_dir, checkpoints=checkpoints, rank=rank, world_size=world_size,
               watched=("byol_val_loss",))
    return {"history": history, "steps": state["step"], "total_steps": total_steps, "final_tau": state["tau"],
            "batch_size": batch_size}
