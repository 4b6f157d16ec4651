"""Supervised fine-tuning: BCE (multi-label) or cross-entropy (multi-class), model selection and early
stopping on a validation metric only; the selected checkpoint's test predictions are stored for the search's one
record at its end (scored here only with `supervised.record_test`).

S0's recipe: BCE-with-logits, AdamW, early stopping patience 10 on val mAUC, best-val checkpoint restored.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..augment import EvalViews
from ..config import ConfigError, TrialConfig, metric_mode, objective
from ..data.loader import CachedBatches, PreparedData, make_loader, set_epoch
from ..explain import eval_cost
from ..metrics import (
    auroc_intervals,
    classification_metrics,
    decisions,
    interval,
    patient_bootstrap,
    resampling_units,
    scored_labels,
    weighted_decision_metrics,
)
from ..models.heads import Classifier, MemberEnsemble, freeze_backbone, mean_probability_logits
from .base import PhaseContext, TrainingPhase
from .common import (
    BEST_FILE,
    Precision,
    build_optimizer,
    build_scheduler,
    compiled,
    current_lr,
    distributed,
    run_epoch,
    save_best,
    step_scheduler,
    unwrap,
)


def resolve_loss(task: str, loss: str) -> str:
    """The loss name for this task ('auto': BCE for multi-label, CE for multi-class); a mismatch is an error."""
    if loss == "auto":
        return "bce" if task == "multilabel" else "ce"
    if loss != "focal" and (loss == "ce") != (task == "multiclass"):
        raise ConfigError(f"supervised.loss={loss} does not fit this {task} data; use "
                          f"{'bce' if task == 'multilabel' else 'ce'}, focal or auto")
    return loss


def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: Optional[torch.Tensor] = None,
               gamma: float = 0.0) -> torch.Tensor:
    """Per-label BCE with logits (times (1 − p_t)^γ: focal) averaged over the **labelled** entries only: a NaN
    target (an uncertain entry under U-Ignore, a blank one under data.missing: ignore — Irvin et al. 2019) adds
    nothing to the loss and gets zero gradient. With every entry labelled it is nn.BCEWithLogitsLoss exactly."""
    known = torch.isfinite(target)
    target = torch.where(known, target, torch.zeros_like(target))
    ce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    if gamma:
        p_t = torch.exp(-F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
        ce = (1 - p_t) ** gamma * ce
    return torch.where(known, ce, torch.zeros_like(ce)).sum() / known.sum().clamp(min=1)


class MaskedBCEWithLogits(nn.Module):
    """nn.BCEWithLogitsLoss over the labelled entries (`masked_bce`)."""

    def __init__(self, pos_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return masked_bce(logits, target, self.pos_weight)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): α·(1 − p_t)^γ times the per-label BCE (multi-label, sigmoid, over the labelled
    entries: `masked_bce`) or the per-image CE (multi-class, softmax, class-weighted and normalised like
    nn.CrossEntropyLoss). α is a plain factor, so α = 1, γ = 0 is exactly BCE / CE."""

    def __init__(self, task: str, alpha: float = 1.0, gamma: float = 2.0, weight: Optional[torch.Tensor] = None,
                 pos_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.task, self.alpha, self.gamma = task, alpha, gamma
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return self.alpha * masked_bce(logits, target, self.pos_weight, self.gamma)
        log_p_t = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        w = self.weight[target] if self.weight is not None else torch.ones_like(log_p_t)
        return (self.alpha * (1 - log_p_t.exp()) ** self.gamma * -log_p_t * w).sum() / w.sum()


def class_weights(targets: np.ndarray, num_classes: int, scheme: str) -> Optional[torch.Tensor]:
    """Single-label class weights from the train split. 'inverse': n / (K·n_c) (scikit-learn's 'balanced');
    's1_count': n_c / n, S1's scheme, which weighs the majority class most — for replication only."""
    if scheme == "none":
        return None
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    if scheme == "inverse":
        weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    else:
        weights = counts / counts.sum()
    return torch.tensor(weights, dtype=torch.float32)


def make_loss(task: str, sc, train_targets: np.ndarray, num_classes: int) -> nn.Module:
    """The configured loss with its weights computed from the training targets."""
    name = resolve_loss(task, sc.loss)
    if task == "multilabel":
        pos_weight = positive_weights(train_targets) if sc.pos_weight else None
        if name == "focal":
            return FocalLoss(task, sc.focal_alpha, sc.focal_gamma, pos_weight=pos_weight)
        return MaskedBCEWithLogits(pos_weight)
    weight = class_weights(train_targets, num_classes, sc.class_weights)
    if name == "focal":
        return FocalLoss(task, sc.focal_alpha, sc.focal_gamma, weight=weight)
    return nn.CrossEntropyLoss(weight=weight)


def undersample_majority(targets: np.ndarray, seed: int) -> np.ndarray:
    """Positions to keep so that the largest class has as many images as the second largest (seeded)."""
    counts = np.bincount(targets)
    if (counts > 0).sum() < 2:
        return np.arange(len(targets))
    majority, runner_up = np.argsort(counts)[-1], np.sort(counts)[-2]
    rng = np.random.default_rng(seed)
    kept = rng.choice(np.flatnonzero(targets == majority), size=runner_up, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(targets != majority), kept]))


def positive_weights(targets: np.ndarray) -> torch.Tensor:
    """BCE pos_weight = n_neg / n_pos per label from the training split (S2, S4), both counted over the labelled
    entries (a masked one is neither); 1 where n_pos = 0."""
    pos, neg = (targets == 1).sum(0), (targets == 0).sum(0)
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def to_probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_batch(model: nn.Module, x: torch.Tensor, views: EvalViews, precision: Precision,
                  multilabel: bool) -> torch.Tensor:
    """One uint8 batch as evaluated: its views (TTA), the logits of their mean probability."""
    vs = [precision.images(v) for v in views(x.to(precision.device, non_blocking=True))]
    with precision.autocast():
        return mean_probability_logits([model(v) for v in vs], multilabel).float()


@torch.no_grad()
def predict(model: nn.Module, loader, views: EvalViews, precision: Precision, multilabel: bool):
    """Logits and targets (on the CPU) for a whole split; with TTA, the logits of the views' mean probability.
    Gathered on the device and copied once: a copy per batch would wait for the device at every batch."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(predict_batch(model, x, views, precision, multilabel))
        targets.append(y.to(precision.device, non_blocking=True))
    return torch.cat(logits).cpu(), torch.cat(targets).cpu()


def measured_cost(model: nn.Module, data: PreparedData, views: EvalViews, precision: Precision) -> dict:
    """The model's cost as it is evaluated, on its device (explain.eval_cost) — on up to 32 validation images."""
    rows = np.sort(data.index.rows("val")[:32])
    images = torch.from_numpy(np.array(data.cache.open()[rows]))
    model.eval()
    multilabel = data.index.task == "multilabel"
    return eval_cost(model, lambda x: predict_batch(model, x, views, precision, multilabel), images,
                     str(precision.device))


def write_predictions(path: Path, frame: pd.DataFrame, classes, targets: np.ndarray, prob: np.ndarray,
                      task: str) -> None:
    out = frame[["path", "patient_id"]].reset_index(drop=True).copy()
    truth = targets if task == "multilabel" else np.eye(len(classes))[targets]
    for j, c in enumerate(classes):  # a masked entry is blank
        out[f"y_{c}"] = pd.array(np.where(np.isfinite(truth[:, j]), truth[:, j], np.nan), dtype="Int64")
    for j, c in enumerate(classes):
        out[f"p_{c}"] = prob[:, j]
    out.to_csv(path, index=False)


def _improved(value: float, best: Optional[float], mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def classifier(backbone: nn.Module | list[nn.Module], num_features: int | list[int], num_classes: int,
               drop_rate: float, task: str) -> Classifier | MemberEnsemble:
    """The fine-tuned model: backbone + linear head, or a member ensemble over several backbones (both CASS
    arms), whose output is the logit of the members' mean probability."""
    if isinstance(backbone, (list, tuple)):
        return MemberEnsemble([Classifier(b, w, num_classes, drop_rate) for b, w in zip(backbone, num_features)],
                              task == "multilabel")
    return Classifier(backbone, num_features, num_classes, drop_rate)


class SupervisedPhase(TrainingPhase):
    """Fine-tune `backbone` with a new head; `run()` returns the summary (val metrics at the selected epoch, test
    metrics of that checkpoint, thresholds chosen on val) and writes best.pt and the predictions. `carry`: what each
    checkpoint also holds (the SSL phase's summary), so a resumed fine-tune still has it."""

    name, watched = "supervised", ("val_loss",)

    def __init__(self, cfg: TrialConfig, data: PreparedData, context: PhaseContext,
                 backbone: nn.Module | list[nn.Module], num_features: int | list[int], carry: dict | None = None):
        super().__init__(cfg, data, context)
        self.backbone, self.num_features, self.carry = backbone, num_features, carry or {}
        self.untrained = data.index.untrained()  # no positive in train: never thresholded, decided or averaged
        self.mode = metric_mode(cfg.supervised.selection_metric)
        self.best = {"score": None, "epoch": 0, "stale": 0, "val": None, "latest": None}  # the selection so far
        self.cost: dict = {}  # measured once, at the end of the first epoch evaluated (rank 0's, as every metric)

    def build(self) -> None:
        cfg, sc, index, context = self.cfg, self.cfg.supervised, self.data.index, self.context
        self.epochs, self.accum_steps = sc.epochs, sc.accum_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = self.precision.module(classifier(self.backbone, self.num_features, self.data.num_classes,
                                                      cfg.model.drop_rate, index.task))
        self.make_views()
        train_set = self.data.dataset("train")
        if sc.undersample_majority and index.task == "multiclass":
            keep = undersample_majority(train_set.targets, cfg.seed)
            train_set = CachedBatches(self.data.cache, train_set.rows[keep], train_set.targets[keep])
        self.loss_fn = make_loss(index.task, sc, train_set.targets, self.data.num_classes).to(self.device)
        if sc.freeze:
            for member in getattr(self.model, "members", [self.model]):
                freeze_backbone(member.backbone, sc.freeze)
        drop_last = len(train_set) // context.world_size > sc.batch_size
        self.loader = make_loader(train_set, sc.batch_size, shuffle=True, drop_last=drop_last, seed=cfg.seed,
                                  rank=context.rank, world_size=context.world_size, key="supervised.batch_size",
                                  device=self.device, data=cfg.data)
        self.val_loader = make_loader(self.data.dataset("val"), sc.batch_size, shuffle=False, device=self.device,
                                      data=cfg.data)
        self.optimizers = [build_optimizer(self.model, sc.optimizer)]
        self.schedulers = [build_scheduler(self.optimizers[0], sc.scheduler,
                                           mode=metric_mode(sc.scheduler.plateau_metric))]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if sc.head_warmup_epochs and context.resume is None:  # S0's stage 1 (a resumed run had passed it)
            with head_only(self.model):
                self.trained = distributed(self.model, context.world_size, self.device)  # DDP over the head alone
                warm_up_head(self.model, self.loader, self.micro_step, sc, self.scaler)
        self.trained = compiled(distributed(self.model, context.world_size, self.device), cfg)

    def restore(self, resume: dict) -> None:
        super().restore(resume)
        sc = self.cfg.supervised
        self.best.update(score=resume["best_score"], epoch=resume["best_epoch"], stale=resume["stale"])
        if sc.early_stopping_patience and self.best["stale"] >= sc.early_stopping_patience:
            self.start = sc.epochs  # it had already stopped early

    def micro_step(self, batch) -> torch.Tensor:
        x, y = batch
        x = self.precision.images(self.augment(x.to(self.device, non_blocking=True)))
        with self.precision.autocast():
            logits = self.trained(x)
        y = y.to(self.device)
        if len(logits) != len(y):  # a member ensemble in training: each member's logits, stacked
            y = y.repeat(len(logits) // len(y), *[1] * (y.dim() - 1))
        return self.loss_fn(logits.float(), y)

    def evaluate(self, epoch: int, train_loss: float) -> dict:
        index = self.data.index
        if not self.cost and self.context.rank == 0:
            self.cost.update(measured_cost(self.model, self.data, self.eval_views, self.precision))
        logits, targets = predict(self.model, self.val_loader, self.eval_views, self.precision,
                                  index.task == "multilabel")
        self.best["latest"] = (logits, targets)
        val_loss = float(self.loss_fn(logits.to(self.device), targets.to(self.device)))
        prob = to_probabilities(index.task, logits).numpy()
        val = classification_metrics(index.task, targets.numpy(), prob, index.classes,
                                     rule=self.cfg.supervised.threshold, untrained=self.untrained)["metrics"]
        return {"train_loss": train_loss, "val_loss": val_loss, "lr": current_lr(self.optimizers[0]),
                **{f"val_{k}": v for k, v in val.items()}, **self.cost}

    def best_checkpoint(self, epoch: int, score: float) -> dict:
        """best.pt: the weights with what predict needs to rebuild and feed them (config, classes, task,
        normalisation)."""
        index = self.data.index
        return {"model": unwrap(self.model).state_dict(), "epoch": epoch, self.cfg.supervised.selection_metric: score,
                "config": self.cfg.model_dump(mode="json"), "classes": list(index.classes), "task": index.task,
                "normalization": [self.eval_views.mean, self.eval_views.std]}

    def after_evaluate(self, metrics: dict) -> None:
        """Model selection on the agreed (rank 0's) metrics: best.pt replaced when the metric improves."""
        sc, best = self.cfg.supervised, self.best
        score = metrics[sc.selection_metric]
        if _improved(score, best["score"], self.mode):
            best.update(score=score, epoch=metrics["epoch"], stale=0, val=best["latest"])
            if self.context.rank == 0:
                save_best(self.run_dir, self.best_checkpoint(metrics["epoch"], score))
        else:
            best["stale"] += 1
        metrics[objective(sc.selection_metric)] = best["score"] if best["score"] is not None else float("nan")
        self.history.append(metrics)
        step_scheduler(self.schedulers[0], metrics["epoch"], metrics, sc.scheduler)

    def should_stop(self, metrics: dict) -> bool:
        """Early stopping on the selection metric, or a cost over the study's limits (infeasible: no more epochs)."""
        sc = self.cfg.supervised
        stale = bool(sc.early_stopping_patience) and self.best["stale"] >= sc.early_stopping_patience
        return stale or bool(sc.over_limits(metrics))

    def extra_state(self) -> dict:
        return {"best_score": self.best["score"], "best_epoch": self.best["epoch"], "stale": self.best["stale"],
                **self.carry}

    def finish(self) -> dict:
        best = self.best
        if self.context.rank != 0:  # rank 0 holds best.pt and scores it; the other ranks' work ends with training
            return {"best_epoch": best["epoch"], "epochs_run": len(self.history), "history": self.history, "val": {},
                    "test": {}}
        if (self.run_dir / BEST_FILE).is_file():
            state = torch.load(self.run_dir / BEST_FILE, map_location=self.device, weights_only=True)
            unwrap(self.model).load_state_dict(state["model"])
        else:  # no epoch had a defined selection metric: the last weights are what there is
            save_best(self.run_dir, self.best_checkpoint(len(self.history), float("nan")))
        return evaluate_selected(self.cfg, self.data, self.model, self.eval_views, self.precision, self.run_dir,
                                 best["epoch"], self.history, best["val"], self.context.rank)


@contextlib.contextmanager
def head_only(model: Classifier | MemberEnsemble):
    """The backbone frozen for the duration, then each of its parameters trainable as before."""
    was_trainable = [p.requires_grad for p in model.backbone.parameters()]
    model.backbone.requires_grad_(False)
    try:
        yield
    finally:
        for p, trainable in zip(model.backbone.parameters(), was_trainable):
            p.requires_grad_(trainable)


def warm_up_head(model: Classifier | MemberEnsemble, train_loader, micro_step, sc, scaler=None) -> None:
    """S0's stage 1: `head_warmup_epochs` epochs training only the head at `head_warmup_lr` (its own
    optimizer, no schedule); stage 2 is the normal loop over the configured (unfrozen) parameters at
    optimizer.lr. Not selected on and not reported: it only initialises the head."""
    optimizer = build_optimizer(model.head, sc.optimizer.model_copy(update={"lr": sc.head_warmup_lr}))
    params = list(model.head.parameters())
    for epoch in range(sc.head_warmup_epochs):
        model.train()
        set_epoch(train_loader, 1_000_000 + epoch)  # its own shuffles, apart from stage 2's
        run_epoch(train_loader, micro_step, [optimizer], params, sc.accum_steps, scaler=scaler)


def evaluate_selected(cfg: TrialConfig, data: PreparedData, model, eval_views, precision: Precision, run_dir: Path,
                      best_epoch: int, history: list, val_predictions=None, rank: int = 0) -> dict:
    """Score the selected checkpoint on val, choosing its thresholds there; every AUROC with its 95 % bootstrap
    interval over patients (images where there are none), labelled as computed on the selection set
    (`mean_auroc_selection_ci_low`, ...: the data that chose the epoch, so optimistic). Test is predicted and its
    predictions stored for the search's one record at its end, not scored — unless `supervised.record_test`,
    which scores it here with val's thresholds (`test`, with `..._ci_low/high`).

    `val_predictions`: the (logits, targets) the selected epoch already computed, so val is not re-run."""
    index, out = data.index, {"test": {}}
    untrained, thresholds = index.untrained(), None
    scored_columns = scored_labels(index.task, index.classes, untrained)  # what the means average
    for split in ("val", "test"):
        if split == "val" and val_predictions is not None:
            logits, targets = val_predictions
        else:
            loader = make_loader(data.dataset(split), cfg.supervised.batch_size, shuffle=False,
                                 device=precision.device, data=cfg.data)
            logits, targets = predict(model, loader, eval_views, precision, index.task == "multilabel")
        prob = to_probabilities(index.task, logits).numpy()
        rows = index.rows(split)
        if rank == 0:
            write_predictions(run_dir / f"predictions_{split}.csv", index.frame.iloc[rows], index.classes,
                              targets.numpy(), prob, index.task)
        if split == "test" and not cfg.supervised.record_test:
            continue
        scored = classification_metrics(index.task, targets.numpy(), prob, index.classes, thresholds,
                                        cfg.supervised.threshold, untrained)
        if split == "val":  # thresholds are chosen here and only applied to test
            thresholds = None if scored["thresholds"] is None else np.asarray(scored["thresholds"], dtype=float)
            out["thresholds"] = scored["thresholds"]
        if "confusion_matrix" in scored:
            out[f"{split}_confusion_matrix"] = scored["confusion_matrix"]
        out[split] = scored["metrics"]
        truth = targets.numpy() if index.task == "multilabel" else np.eye(len(index.classes))[targets.numpy()]
        frame = index.frame.iloc[rows]
        units = resampling_units(frame["patient_id"], frame["path"])
        ci = "selection_ci" if split == "val" else "ci"
        boot = patient_bootstrap(units, seed=cfg.seed)  # one set of patient resamples for every interval below
        for key, (low, high) in auroc_intervals(truth[:, scored_columns], prob[:, scored_columns], units,
                                                [index.classes[j] for j in scored_columns], weights=boot).items():
            out[split].update({f"{key}_{ci}_low": low, f"{key}_{ci}_high": high})
        if index.task != "multilabel":  # accuracy and balanced accuracy at the chosen decision, with intervals
            scored_at = decisions(index.task, prob, scored["thresholds"])
            resampled = weighted_decision_metrics(truth, scored_at, boot, True)
            for key in ("accuracy", "balanced_accuracy"):
                low, high = interval(resampled[key])
                out[split].update({f"{key}_{ci}_low": low, f"{key}_{ci}_high": high})
        out[f"{split}_skipped_labels"] = scored["skipped_labels"]
    out.update({"best_epoch": best_epoch, "epochs_run": len(history), "history": history})
    if rank == 0:
        (run_dir / "supervised_history.json").write_text(json.dumps(history, indent=1))
    return out
