"""One training phase as a class (nnU-Net v2's nnUNetTrainer and solo-learn's BaseMethod as the models): the
set-up every phase shares is written once, its state lives on `self`, and BYOL, CASS and the supervised fine-tune
each override the hooks for what differs — `build` (model, loaders, optimizers, schedulers), `begin`, `micro_step`,
`evaluate`, `after_evaluate`, `extra_state` (what its checkpoint adds) and `finish` (its summary).

    phase = ByolPhase(cfg, data, PhaseContext(device, run_dir, report), backbone, num_features)
    summary = phase.run()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import TrialConfig
from ..data.loader import PreparedData, set_epoch
from .common import (
    Diverged,
    Precision,
    Report,
    build_views,
    from_rank0,
    no_report,
    restore_training,
    run_epoch,
    save_state,
    training_state,
)
from .probe import Monitor


@dataclass(frozen=True)
class PhaseContext:
    """Where and how a phase runs: its device and run directory, where it reports each epoch, its rank among
    `world_size` DDP ranks, whether each epoch's report carries a full-state checkpoint (`checkpoints`), and the
    state a resumed run continues from (`resume`: common.load_state's)."""

    device: torch.device
    run_dir: Path
    report: Report = no_report
    rank: int = 0
    world_size: int = 1
    checkpoints: bool = False
    resume: dict | None = None


class TrainingPhase:
    """A phase's epochs: train → evaluate → after_evaluate (selection, schedules) → checkpoint → report, until its
    budget or `should_stop`. Set on `self` by `build`: `model` (what is checkpointed), `trained` (what the step runs:
    compiled, DDP-wrapped), `loader`, `optimizers`, `schedulers`, `params` (what is clipped), `accum_steps`."""

    name: str  # "byol", "cass", "supervised": its reports' `phase`, its checkpoint's
    watched: tuple[str, ...] = ()  # metrics whose non-finite value ends the phase as Diverged

    def __init__(self, cfg: TrialConfig, data: PreparedData, context: PhaseContext):
        self.cfg, self.data, self.context = cfg, data, context
        self.device, self.run_dir = context.device, context.run_dir
        self.precision = Precision(cfg, context.device)
        self.scaler = self.precision.scaler()
        self.augment = self.eval_views = None  # build's: `self.make_views()` where its model is made
        self.history: list[dict] = []
        self.start = 0
        self.epochs = 0
        self.model: nn.Module
        self.trained: nn.Module
        self.loader = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list = []
        self.params: list[nn.Parameter] = []
        self.accum_steps = 1

    # ── hooks ───────────────────────────────────────────────────────────────────────────────────────────────────
    def build(self) -> None:
        """The model, loaders, optimizers and schedulers on `self`; `self.epochs`, the phase's budget."""
        raise NotImplementedError

    def begin(self) -> None:
        """After `build` and any restore, before the first epoch: what needs the restored state (the SSL phases'
        probe and collapse watch read the history)."""

    def micro_step(self, batch) -> torch.Tensor:
        """One micro-batch's loss (common.run_epoch accumulates and steps)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After each optimizer step (BYOL: the target network's EMA)."""

    def evaluate(self, epoch: int, train_loss: float) -> dict:
        """The epoch's metrics (rank 0's are broadcast to every rank)."""
        raise NotImplementedError

    def after_evaluate(self, metrics: dict) -> None:
        """Selection, history and LR schedule on the agreed metrics; it may add metrics."""
        self.history.append(metrics)

    def should_stop(self, metrics: dict) -> bool:
        return False

    def extra_state(self) -> dict:
        """What the phase's checkpoint holds beyond the model, optimizers, schedulers and history."""
        return {}

    def restore(self, resume: dict) -> None:
        """Continue from a checkpointed state: the model, optimizers, schedulers and history, and the next epoch."""
        self.history, self.start = restore_training(resume, self.model, self.optimizers, self.schedulers)

    def finish(self) -> dict:
        """The phase's summary, once its epochs are done."""
        return {"history": self.history}

    # ── the shared skeleton ─────────────────────────────────────────────────────────────────────────────────────
    def make_views(self) -> None:
        """The training augmentation and the eval views (TTA) on the phase's device (common.build_views)."""
        self.augment, self.eval_views = build_views(self.cfg, self.data, self.device)

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        set_epoch(self.loader, epoch)
        return run_epoch(self.loader, self.micro_step, self.optimizers, self.params, self.accum_steps,
                         after_step=self.after_step, model=self.trained, scaler=self.scaler)

    def state(self, epochs_done: int) -> dict:
        return training_state(self.name, epochs_done, self.model, self.optimizers, self.schedulers, self.history,
                              **self.extra_state())

    def run(self) -> dict:
        self.build()
        if self.context.resume is not None:
            self.restore(self.context.resume)
        self.begin()
        self.epoch_loop()
        return self.finish()

    def epoch_loop(self) -> None:
        """The train → evaluate → schedule → checkpoint → report skeleton every phase shares. A non-finite training
        loss or `watched` metric raises `Diverged`. The report of the phase's last epoch (its budget or an early
        stop) carries `last: True`; with `checkpoints`, rank 0 hands each report the full training state."""
        context = self.context
        for epoch in range(self.start, self.epochs):
            try:
                train_loss = self.train_epoch(epoch)
            except FloatingPointError as err:
                raise Diverged(self.name, epoch + 1, str(err)) from None
            metrics = {"epoch": epoch + 1, **self.evaluate(epoch, train_loss)}
            metrics = from_rank0({k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()},
                                 context.world_size)  # plain numbers: a checkpointed history loads with weights_only
            bad = [k for k in self.watched if not math.isfinite(metrics[k])]
            if bad:
                raise Diverged(self.name, epoch + 1, f"non-finite {', '.join(bad)}")
            self.after_evaluate(metrics)
            stop = self.should_stop(metrics)
            checkpoint = None
            if context.checkpoints and context.rank == 0:
                checkpoint = save_state(self.run_dir, self.state(epoch + 1))
            context.report({"phase": self.name, **metrics, "last": stop or epoch + 1 == self.epochs}, checkpoint)
            if stop:
                break


class SslPhase(TrainingPhase):
    """A self-supervised phase (BYOL, CASS): its representation probed and watched for collapse every epoch
    (probe.Monitor), over the history a resume restored."""

    def begin(self) -> None:
        self.monitor = Monitor(self.cfg, self.data, self.name, self.epochs, self.history)
