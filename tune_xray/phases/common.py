"""What every phase shares: seeding, device, timm optimizers and schedulers, AMP, the epoch loop.

Plain PyTorch: a phase runs the same on a laptop CPU, one GPU, or as one DDP rank, and reports through
the `report(metrics, checkpoint_dir)` callback it is given.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..augment import EvalViews, TrainAugment, normalization
from ..config import OptimizerConfig, SchedulerConfig, TrialConfig


class Report(Protocol):
    def __call__(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None: ...


def no_report(metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
    pass


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); `deterministic`: deterministic kernels only (an op that has
    none raises, naming itself), cuDNN without benchmarking."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reuse_freed_memory() -> None:
    """CPU: let glibc keep and reuse freed large blocks instead of returning them to the OS.

    Every training batch allocates tens of MB of fresh tensors; with glibc's defaults each is mmap'd
    and page-faulted anew, about a third of the augmentation time on the 2-core CI machine
    (scripts/bench_data.py). Same effect as GLIBC_TUNABLES mmap/trim thresholds; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD: 256 MiB
    libc.mallopt(-1, 1 << 29)  # M_TRIM_THRESHOLD: 512 MiB


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of `amp` (auto | bf16 | fp16 | off) on `device`: None (fp32) on CPU or when off; auto is
    bf16 where the GPU supports it (Ampere and later), else fp16 (which needs a GradScaler)."""
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class Precision:
    """How a phase computes on its device: the autocast dtype (every backbone alike, S0 flaw 7), the GradScaler
    fp16 needs (a pass-through otherwise), and channels_last for images and weights on CUDA."""

    def __init__(self, cfg: TrialConfig, device: torch.device):
        self.device, self.dtype = device, amp_dtype(cfg.amp, device)
        self.channels_last = cfg.channels_last and device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def module(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)


def compiled(model: nn.Module, cfg: TrialConfig) -> nn.Module:
    """torch.compile of the module a phase trains (after DDP: compiled DDP keeps its bucketed all-reduce),
    when `model.compile`; `unwrap` reaches the weights through both wrappers."""
    return torch.compile(model) if cfg.model.compile else model


# timm's "sgd" is Nesterov SGD; S0 (and torch.optim.SGD) use plain momentum: timm calls that "momentum".
_TIMM_OPT = {"sgd": "momentum", "adamw": "adamw", "adam": "adam", "lars": "lars"}


FUSED = ("adamw", "adam", "sgd")  # torch's fused CUDA implementations: one kernel for all parameters


def build_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2; bias and norm parameters are excluded from weight decay. For a module on
    CUDA, AdamW, Adam and SGD are torch's fused implementations (with a launch per tensor the step was
    launch-bound: `AdamW.step` ≈20 % of a DenseNet-121 step's GPU time on an H100); LARS is timm's."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name in FUSED and next(module.parameters()).is_cuda:
        kwargs["fused"] = True
    if cfg.name in ("sgd", "lars"):
        kwargs["momentum"] = cfg.momentum
    if cfg.name == "lars":
        kwargs["trust_coeff"] = cfg.trust_coeff
    return create_optimizer_v2(module, opt=_TIMM_OPT[cfg.name], **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, mode: str = "min"):
    """A per-epoch timm scheduler (`step(epoch, metric)`), or None for a constant LR.

    cosine: T_max epochs to eta_min, then stays there (never rises again: S0 flaw 6).
    restarts: cosine cycles of t_0 epochs, each back to the base LR (SGDR).
    warmup_cosine: linear warm-up for warmup_epochs, then cosine over t_max.
    plateau: × gamma after `patience` epochs without improvement of `plateau_metric`.
    """
    lr = optimizer.param_groups[0]["lr"]
    if cfg.name == "none":
        return None
    if cfg.name == "step":
        sched, _ = create_scheduler_v2(optimizer, "step", num_epochs=10**6, decay_epochs=cfg.step_size,
                                       decay_rate=cfg.gamma)
    elif cfg.name == "plateau":  # torch's, as S0 used: its state checkpoints (timm's is deprecated)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.gamma,
                                                           patience=cfg.patience, min_lr=cfg.eta_min)
    elif cfg.name == "cosine":
        sched, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.t_max, min_lr=cfg.eta_min)
    elif cfg.name == "restarts":
        sched, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.t_0, min_lr=cfg.eta_min,
                                       cycle_limit=10**6, cycle_decay=1.0)
    else:  # warmup_cosine
        sched, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.t_max, min_lr=cfg.eta_min,
                                       warmup_epochs=cfg.warmup_epochs, warmup_prefix=True,
                                       warmup_lr=cfg.eta_min or lr * 1e-3)
    return sched


def step_scheduler(scheduler, epochs_done: int, metrics: dict, cfg: SchedulerConfig) -> None:
    """Advance a per-epoch scheduler after `epochs_done` epochs (plateau reads its metric)."""
    if scheduler is None:
        return
    if cfg.name == "plateau":
        scheduler.step(metrics[cfg.plateau_metric])
    else:
        scheduler.step(epochs_done)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


class Diverged(RuntimeError):
    """A non-finite loss: the run stops at once. A deterministic divergence (too high an LR, say) is a result
    of the configuration, not a fault to retry."""

    def __init__(self, phase: str, epoch: int, what: str):
        super().__init__(f"{phase} diverged at epoch {epoch}: {what}")
        self.phase, self.epoch, self.what = phase, epoch, what


class Collapsed(RuntimeError):
    """A self-supervised phase whose representation has collapsed (phases.probe.Monitor): the trial ends at once
    as `collapsed` — a result of its configuration, told to the searcher, never complete or pruned."""

    def __init__(self, phase: str, epoch: int, what: str, metrics: dict | None = None):
        super().__init__(f"{phase} collapsed at epoch {epoch}: {what}")
        self.phase, self.epoch, self.what, self.metrics = phase, epoch, what, metrics or {}


def _all_ranks_agree(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (DDP): every rank then takes the same branch, so none
    waits in a collective the others left."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


LOSS_READ_EVERY = 32  # micro-batches between host reads of the summed loss (a read waits for the device)


def run_epoch(batches: Iterable, micro_step: Callable[[object], torch.Tensor],
              optimizers: list[torch.optim.Optimizer], params: list[nn.Parameter], accum_steps: int = 1,
              n_batches: Optional[int] = None, after_step: Optional[Callable[[], None]] = None,
              max_grad_norm: Optional[float] = None, model: Optional[nn.Module] = None,
              scaler: Optional[torch.amp.GradScaler] = None, read_every: int = LOSS_READ_EVERY) -> float:
    """One pass over `batches` with correct gradient accumulation; returns the mean micro-batch loss.

    Every micro-batch calls backward on loss / k (k = the micro-batches in its group, so a short last
    group is weighted right); the optimizers step once per group. S0 called backward only on every k-th
    micro-batch, so its effective batch was 1/k of the claimed one. With a DDP `model`,
    the micro-batches before a group's last skip the gradient all-reduce (`no_sync`). With an fp16 `scaler` the
    loss is scaled, gradients are unscaled before clipping, and a step whose gradients hold inf/NaN is skipped.

    The losses are summed on the device and read every `read_every` micro-batches and at the end: a read per
    step would make the host wait for the device at every step. A non-finite loss on any rank then raises
    `FloatingPointError` on every rank (the run stops: the weights it reached are not used).
    """
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    n_batches = n_batches if n_batches is not None else len(batches)
    total, count = None, 0
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        group_start = (i // accum_steps) * accum_steps
        k = min(accum_steps, n_batches - group_start)
        last_of_group = i + 1 == group_start + k
        sync = contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss = micro_step(batch)
            scaler.scale(loss / k).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        count += 1
        if last_of_group:
            if max_grad_norm:
                for opt in optimizers:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            for opt in optimizers:
                scaler.step(opt)
                opt.zero_grad(set_to_none=True)
            scaler.update()
            if after_step is not None:
                after_step()
        if count % read_every == 0:
            _finite_or_raise(total, count)
    return _finite_or_raise(total, count) / count if count else 0.0


def _finite_or_raise(total: torch.Tensor, steps: int) -> float:
    """The summed loss on the host; FloatingPointError on every rank if it is not finite on any."""
    value = float(total)
    if _all_ranks_agree(not math.isfinite(value)):
        raise FloatingPointError(f"non-finite training loss (sum {value}) within the first {steps} steps")
    return value


def from_rank0(value, world_size: int):
    """Rank 0's value on every rank (DDP): decisions made from metrics (early stop, plateau) cannot differ."""
    if world_size <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def eval_loss(model: nn.Module, loader, batch_loss: Callable[[torch.Tensor], torch.Tensor],
              precision: "Precision") -> float:
    """Mean of `batch_loss(images)` over a loader with `model` in eval mode (BN statistics fixed), then back
    to train mode: the self-supervised phases' validation loss, for monitoring and plateau schedules."""
    model.eval()
    losses = []
    for x, _ in loader:
        with precision.autocast():
            losses.append(batch_loss(x).detach().float())
    model.train()
    return float(torch.stack(losses).mean()) if losses else 0.0  # one host read


def optimizer_steps_per_epoch(n_batches: int, accum_steps: int) -> int:
    return math.ceil(n_batches / accum_steps)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compiled wrapper, for state dicts."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def build_views(cfg: TrialConfig, data, device: torch.device) -> tuple[TrainAugment, EvalViews]:
    """The trial's train augmentation and eval/TTA views on `device`, normalised for its backbone."""
    stats = data.pixel_stats() if cfg.augment.normalize == "dataset" else None
    mean, std = normalization(cfg.augment, cfg.model.in_chans, stats)
    args = (cfg.augment, cfg.data.cache_size, cfg.model.in_chans, mean, std)
    return TrainAugment(*args).to(device), EvalViews(*args).to(device)


STATE_FILE = "state.pt"


BEST_FILE = "best.pt"  # the selected checkpoint, written when the selection metric improves


def save_state(run_dir: Path, state: dict) -> str:
    """Write a phase's full state (model, optimizer, scheduler, progress) to a fresh checkpoint directory,
    with the run's best.pt so far, and return its path; `report` hands it on (Ray Train persists it, then it
    may be deleted)."""
    directory = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=run_dir))
    torch.save(state, directory / STATE_FILE)
    if (run_dir / BEST_FILE).is_file():
        os.link(run_dir / BEST_FILE, directory / BEST_FILE)  # no copy: best.pt is replaced, never rewritten
    return str(directory)


def save_best(run_dir: Path, payload: dict) -> None:
    """Replace best.pt atomically (a new file, then rename): checkpoints that link the old one keep it."""
    tmp = run_dir / f".{BEST_FILE}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / BEST_FILE)


def load_state(checkpoint_dir: str | Path, run_dir: Path | None = None) -> dict:
    """A state written by `save_state`, read with `weights_only=True`: a checkpoint on shared storage is
    untrusted input, and a state holds only tensors and plain data. Its best.pt goes back into `run_dir`."""
    checkpoint_dir = Path(checkpoint_dir)
    if run_dir is not None and (checkpoint_dir / BEST_FILE).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkpoint_dir / BEST_FILE, run_dir / BEST_FILE)
    return torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)


def plain_state(obj) -> dict:
    """A scheduler's state without callables (SWALR keeps its anneal function there), so it loads with
    `weights_only=True`; the object being restored already has them."""
    return {k: v for k, v in obj.state_dict().items() if not callable(v)}


def training_state(phase: str, epoch: int, model: nn.Module, optimizers: list, schedulers: list, history: list,
                   **extra) -> dict:
    """What a phase needs to continue after `epoch`: weights, its optimizers and schedulers (one each, or one
    per arm as in CASS), history, its own extras."""
    return {"phase": phase, "epoch": epoch, "model": unwrap(model).state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers],
            "schedulers": [None if sched is None else plain_state(sched) for sched in schedulers],
            "history": history, **extra}


def restore_training(resume: dict, model: nn.Module, optimizers: list, schedulers: list) -> tuple[list, int]:
    """Load a `training_state` back; returns (history so far, epochs already done)."""
    unwrap(model).load_state_dict(resume["model"])
    for opt, state in zip(optimizers, resume["optimizers"], strict=True):
        opt.load_state_dict(state)
    for sched, state in zip(schedulers, resume["schedulers"], strict=True):
        if sched is not None:
            sched.load_state_dict(state)
    return list(resume["history"]), resume["epoch"]


def distributed(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """DDP across the ranks of one trial (the process group is set up by the launcher, e.g. Ray Train)."""
    if world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
