"""The representation probe during self-supervision: a weighted kNN classifier on the frozen backbone's pooled
features, scored with the study's metric on validation — the number ASHA can judge an SSL phase on (a lower BYOL
loss is not a better backbone), and what ends a collapsed one.

kNN rather than an online linear head (solo-learn's other monitor): it trains nothing, so its value depends on the
features alone — not on a head's learning rate or on how many epochs it has had — and it is the same at every
epoch of every trial. The rule is the weighted kNN of Wu et al. 2018 ("Unsupervised feature learning via
non-parametric instance discrimination"), as DINO (Caron et al. 2021) monitors with it: cosine similarity to the
k nearest labelled images, each neighbour's labels weighted by exp(s / T); k = 20 and T = 0.07 are DINO's. The
labelled images are a fixed, stratified subset of train (`ssl.probe_images`, chosen by the split seed alone: the
same for every epoch and trial of a search); validation is read whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrialConfig
from ..data.loader import PreparedData
from ..metrics import classification_metrics
from ..record.names import bare

CHANCE_AUROC = 0.5
PROBE_CHANCE_MARGIN = 0.02  # a probe's mean AUROC at most this above 0.5 is at chance


def probe_rows(targets: np.ndarray, task: str, n: int, seed: int) -> np.ndarray:
    """At most `n` positions of `targets` (the train split's), stratified: each image's stratum is its class
    (single-label) or its rarest positive label (multi-label; no finding a stratum of its own), each stratum
    kept in proportion and at least once; seeded, so a search's trials probe the same images."""
    if len(targets) <= n:
        return np.arange(len(targets))
    if task == "multiclass":
        strata = targets
    else:
        positive = np.nan_to_num(targets) > 0
        rarest = np.argsort(positive.sum(0), kind="stable")
        strata = np.where(positive.any(1), rarest[np.argmax(positive[:, rarest], axis=1)], targets.shape[1])
    rng = np.random.default_rng(seed)
    kept = []
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        kept.append(members[:max(1, round(n * len(members) / len(targets)))])
    chosen = rng.permutation(np.concatenate(kept))  # the rounding may keep a few too many: drop them at random
    return np.sort(chosen[:n])


def knn_scores(train_features: torch.Tensor, train_targets: np.ndarray, features: torch.Tensor, task: str,
               num_classes: int, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """(n, C) scores of `features` by the weighted kNN over the labelled `train_features`: per label, the
    exp(s/T)-weighted mean of the k nearest neighbours' labels (multi-label: 0/1, a masked entry left out of its
    label's mean; single-label: one-hot), s the cosine similarity. Higher means more likely; a probability for
    single-label tasks (rows sum to 1)."""
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(features.float(), dim=1)
    similarity, neighbours = (query @ train.T).topk(min(k, len(train)), dim=1)
    weights = (similarity / temperature).exp().cpu().numpy()  # (n, k)
    neighbours = neighbours.cpu().numpy()
    labels = train_targets.astype(np.float64)
    if task == "multiclass":
        labels = np.eye(num_classes)[train_targets]
    votes = labels[neighbours]  # (n, k, C)
    known = np.isfinite(votes)
    summed = np.einsum("nk,nkc->nc", weights, np.where(known, votes, 0.0))
    total = np.einsum("nk,nkc->nc", weights, known.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, summed / total, 0.0)


@torch.no_grad()
def pooled_features(backbones: list[nn.Module], cache: np.ndarray, rows: np.ndarray, views, precision,
                    batch: int = 256) -> torch.Tensor:
    """The frozen backbones' pooled features of the uint8 cache's `rows` (sorted) at the evaluation view (several
    backbones: each L2-normalised, then side by side), in eval mode, then each back to the mode it was in. Batches
    are read from the memmap as they go: a split is never held in memory."""
    modes = [b.training for b in backbones]
    for b in backbones:
        b.eval()
    out = []
    for start in range(0, len(rows), batch):
        x = torch.from_numpy(np.array(cache[rows[start:start + batch]])).to(precision.device, non_blocking=True)
        x = precision.images(views(x)[0])
        with precision.autocast():
            out.append(torch.cat([F.normalize(b(x).float(), dim=1) for b in backbones], dim=1))
    for b, mode in zip(backbones, modes):
        b.train(mode)
    return torch.cat(out)


@dataclass
class Probe:
    """The probe of one SSL phase: its labelled train rows and validation rows, read from the cache once."""

    task: str
    classes: tuple[str, ...]
    metric: str  # a metric of metrics.classification_metrics: the study's, or mean_auroc where it has none there
    cache: np.ndarray  # the uint8 memmap
    train_rows: np.ndarray
    train_targets: np.ndarray
    val_rows: np.ndarray
    val_targets: np.ndarray
    untrained: list[str]
    k: int
    temperature: float

    @classmethod
    def of(cls, cfg: TrialConfig, data: PreparedData) -> "Probe | None":
        """The trial's probe (None with `ssl.probe_every: 0`)."""
        if not cfg.ssl.probe_every:
            return None
        index = data.index
        train, val = index.rows("train"), index.rows("val")
        kept = np.sort(train[probe_rows(index.targets(train), index.task, cfg.ssl.probe_images,
                                        cfg.data.split_seed)])
        metric = bare(cfg.supervised.selection_metric)
        return cls(index.task, index.classes, "mean_auroc" if metric in ("loss", "mean_auroc") else metric,
                   data.cache.open(), kept, index.targets(kept), val, index.targets(val), index.untrained(),
                   cfg.ssl.probe_k, cfg.ssl.probe_temperature)

    def __call__(self, backbones: list[nn.Module], views, precision) -> dict[str, float]:
        """`probe_val_<metric>` (and `probe_val_mean_auroc`, which collapse is judged on) of the backbones now."""
        train = pooled_features(backbones, self.cache, self.train_rows, views, precision)
        val = pooled_features(backbones, self.cache, self.val_rows, views, precision)
        scores = knn_scores(train, self.train_targets, val, self.task, len(self.classes), self.k, self.temperature)
        scored = classification_metrics(self.task, self.val_targets, scores, self.classes, untrained=self.untrained)
        metrics = scored["metrics"]
        return {f"probe_val_{self.metric}": float(metrics[self.metric]),
                "probe_val_mean_auroc": float(metrics["mean_auroc"])}

    @staticmethod
    def at_chance(metrics: dict) -> bool:
        """Whether a probe's mean AUROC is at chance (at most PROBE_CHANCE_MARGIN above 0.5, or undefined)."""
        return not metrics.get("probe_val_mean_auroc", 1.0) > CHANCE_AUROC + PROBE_CHANCE_MARGIN


def study_probe(metrics: dict) -> float | None:
    """An SSL epoch's probe of the study's metric (`probe_val_<metric>`; its mean AUROC where that is the metric),
    None where the epoch was not probed: what ASHA's SSL rungs and the stored phases' curves read."""
    own = [v for k, v in metrics.items() if k.startswith("probe_val_") and k != "probe_val_mean_auroc"]
    return own[0] if own else metrics.get("probe_val_mean_auroc")


def probe_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether 0-based `epoch` of an `epochs`-long phase is probed: every `every` epochs, and its last."""
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


class Monitor:
    """An SSL phase's probe and collapse watch. `measure` adds the probe's metrics on the epochs it is due;
    `check` (on the epoch's agreed metrics, so every DDP rank decides the same) raises `Collapsed` when BYOL's
    projections have collapsed (`z_std`·√out_dim under `ssl.collapse_std`: the per-dimension std of L2-normalised
    projections is ≈ 1/√d when healthy, → 0 on collapse) or the probe has been at chance `ssl.collapse_probes`
    times in a row. A resumed phase counts the probes at chance at the end of its restored history."""

    def __init__(self, cfg: TrialConfig, data: PreparedData, phase: str, epochs: int, history: list[dict] = ()):
        self.probe, self.ssl, self.phase, self.epochs = Probe.of(cfg, data), cfg.ssl, phase, epochs
        self.at_chance = 0
        for metrics in (m for m in history if "probe_val_mean_auroc" in m):
            self.at_chance = self.at_chance + 1 if Probe.at_chance(metrics) else 0

    def measure(self, epoch: int, backbones: list[nn.Module], views, precision) -> dict[str, float]:
        if self.probe is None or not probe_due(epoch, self.epochs, self.ssl.probe_every):
            return {}
        return self.probe(backbones, views, precision)

    def check(self, metrics: dict, out_dim: int | None = None) -> None:
        from .common import Collapsed

        z_std = metrics.get("z_std")
        if out_dim and self.ssl.collapse_std and z_std is not None and z_std * out_dim ** 0.5 < self.ssl.collapse_std:
            raise Collapsed(self.phase, metrics["epoch"], f"z_std·√out_dim {z_std * out_dim ** 0.5:.4f} below "
                            f"ssl.collapse_std {self.ssl.collapse_std:g} (the projections have collapsed)", metrics)
        if "probe_val_mean_auroc" not in metrics:
            return
        self.at_chance = self.at_chance + 1 if Probe.at_chance(metrics) else 0
        if self.ssl.collapse_probes and self.at_chance >= self.ssl.collapse_probes:
            raise Collapsed(self.phase, metrics["epoch"], f"the probe at chance {self.at_chance} times in a row (mean "
                            f"AUROC {metrics['probe_val_mean_auroc']:.4f}; ssl.collapse_probes "
                            f"{self.ssl.collapse_probes})", metrics)
