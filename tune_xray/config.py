"""A trial's configuration: pydantic models with extra="forbid", so a typo is an error naming the key.

Defaults follow S0 (the SSM-backbone + BYOL study on ChestX-ray14) where S0 states a value; the embedded synthetic
dataset is the default data so that `python -m tune_xray.train` runs on a fresh machine.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .record.names import COSTS, JUDGED_IN_TRIAL


class ConfigError(ValueError):
    """A configuration file or override that does not validate; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Range = tuple[float, float]


class TableConfig(_Strict):
    """How a label table (`csv:PATH`: CSV, TSV or parquet) reads; each column named is checked to exist."""

    image_column: Optional[str] = Field(None, description="image paths, relative to the table's folder or image_root")
    image_root: Optional[str] = None
    label_column: Optional[str] = Field(None, description="one column of class names ('|' between several: "
                                        "multi-label)")
    label_columns: Optional[list[str]] = Field(None, min_length=1, description="one column per label holding 1 / 0 "
                                               "/ -1 (uncertain) / blank (not mentioned): multi-label")
    patient_column: Optional[str] = None
    split_column: Optional[str] = None
    split_values: dict[Literal["train", "val", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"},
        description="the split column's value for each split; a split it lacks is sliced from train by patient")
    view_column: Optional[str] = Field(None, description="with data.views: the rows kept")


class DataConfig(_Strict):
    source: str = Field("synthetic", description="synthetic | nih:PATH | folder:PATH | medmnist:PATH.npz | csv:PATH "
                        "| chexpert:DIR | mimic:DIR")
    table: TableConfig = Field(default_factory=TableConfig)
    uncertain: Literal["zeros", "ones", "ignore"] = Field(
        "zeros", description="a label table's -1 (uncertain) entries: U-Zeros, U-Ones or U-Ignore (left out of the "
        "loss and of every metric; Irvin et al. 2019)")
    missing: Literal["zeros", "ignore"] = Field(
        "zeros", description="a label table's blank (not mentioned) entries: negatives, or left out of the loss and "
        "of every metric")
    views: Optional[list[str]] = Field(None, min_length=1, description="a label table's views kept, e.g. [PA, AP] "
                                       "(data.table.view_column; chexpert: Frontal by default, mimic: PA and AP)")
    split: Literal["official", "random"] = Field(
        "official", description="official test list (+ patient-wise val slice) or S0's random patient 70/10/20")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="random and folder splits")
    split_seed: int = 42
    patient_pattern: Optional[str] = Field(
        None, description="folder data: a regular expression with one group that finds the patient in an image's "
        "path relative to the folder (the pediatric pneumonia set's person1_virus_6.jpeg: 'person(\\d+)_'); the "
        "splits are then patient-disjoint (checked) and intervals resample patients")
    positive_class: Optional[str] = Field(
        None, description="two-class data: the positive class (one AUROC, one threshold). Default: the class not "
        "named normal / no finding / negative / healthy where exactly one is, else the second in name order")
    folds: int = Field(0, ge=0, description="K-fold cross-validation over train + val (patient-grouped, label-"
                       "stratified; test untouched): fold `fold` is validation, the others train. 0: no folds")
    fold: int = Field(0, ge=0)
    label_fraction: float = Field(1.0, gt=0, le=1, description="training labels kept (stratified, by patient)")
    label_seed: int = Field(0, description="which subset a label fraction keeps")
    cache_size: int = Field(256, ge=16, description="images are decoded once and stored at this size")
    cache_dir: Optional[str] = None
    channels: Literal[1, 3] = Field(1, description="channels kept in the cache; X-rays are grayscale")
    synthetic_images: int = Field(2000, ge=10)
    synthetic_size: int = Field(256, ge=32)
    synthetic_seed: int = 0
    num_workers: Optional[int] = Field(
        None, ge=0, description="DataLoader workers (batches are memmap slices, cheap); default: 0 on CPU or with "
        "the device cache, 2 on CUDA (they prefetch into pinned memory)")
    device_cache: Union[bool, Literal["auto"]] = Field(
        "auto", description="the whole uint8 cache on the training device, batches gathered there by index (no "
        "loader, no host copies); auto: on CUDA when it takes under half of the trial's share of the GPU's memory")
    device_share: float = Field(
        1.0, gt=0, le=1, description="the share of its GPU a trial holds, for device_cache: auto (the search sets "
        "it from a fractional --gpus-per-trial: packed trials each count their own share, not what is free)")

    @field_validator("patient_pattern")
    @classmethod
    def _one_group(cls, pattern: Optional[str]) -> Optional[str]:
        if pattern is None:
            return pattern
        try:
            groups = re.compile(pattern).groups
        except re.error as err:
            raise ValueError(f"patient_pattern {pattern!r} is not a regular expression: {err}") from None
        if groups != 1:
            raise ValueError(f"patient_pattern {pattern!r} has {groups} groups; expected exactly one (the patient)")
        return pattern

    @model_validator(mode="after")
    def _fold(self):
        if self.folds == 1 or (self.folds and self.fold >= self.folds) or (not self.folds and self.fold):
            raise ValueError(f"folds={self.folds}, fold={self.fold}: K-fold needs folds >= 2 and 0 <= fold < folds "
                             "(folds 0: the split as it is, fold 0)")
        return self


class AugmentConfig(_Strict):
    """On-device kornia augmentations; S0's values (its augmentation ablation) as defaults."""

    image_size: int = Field(224, ge=16)
    crop: Literal["random", "random_resized", "none"] = "random"
    crop_scale: Range = (0.5, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    rotation: float = Field(10.0, ge=0, le=180, description="± degrees; 0 = off")
    brightness: Optional[Range] = None
    contrast: Optional[Range] = None
    erasing: int = Field(0, ge=0, le=3, description="independent RandomErasing transforms stacked")
    erasing_p: float = Field(0.5, ge=0, le=1)
    erasing_scale: Range = (0.02, 0.1)
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_kernel: int = Field(5, ge=3)
    blur_sigma: Range = (0.1, 1.0)
    perspective_p: float = Field(0.0, ge=0, le=1)
    perspective_scale: float = Field(0.2, ge=0, le=1)
    affine_p: float = Field(0.0, ge=0, le=1)
    affine_degrees: float = Field(10.0, ge=0, le=180)
    affine_translate: float = Field(0.1, ge=0, le=1)
    affine_scale: Range = (0.9, 1.1)
    sharpness_p: float = Field(0.0, ge=0, le=1)
    sharpness: float = Field(2.0, ge=0)
    autocontrast_p: float = Field(0.0, ge=0, le=1)
    preprocess: list[Literal["equalize", "clahe", "blur"]] = Field(
        [], description="applied in order to train and eval images alike, before augmentation (S4)")
    clahe_clip: float = Field(2.0, gt=0, description="CLAHE clip limit, OpenCV's scale (its common choice)")
    clahe_grid: int = Field(8, ge=1, description="CLAHE tiles per side")
    normalize: Literal["imagenet", "dataset", "none"] = "imagenet"
    eval_view: Literal["center_crop", "resize"] = "center_crop"
    tta: Literal["none", "hflip", "tencrop"] = Field("none", description="S0 used tencrop at val and test")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("crop_scale", "erasing_scale", "blur_sigma", "affine_scale", "brightness", "contrast"):
            r = getattr(self, name)
            if r is not None and not (0 <= r[0] <= r[1]):
                raise ValueError(f"{name} must be a range [low, high] with 0 <= low <= high, got {list(r)}")
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        return self


class ModelConfig(_Strict):
    backbone: str = "resnet18"
    pretrained: Union[bool, str] = Field(
        False, description="false: from scratch; true: the backbone's default timm tag; a timm tag "
        "(convnext_small.fb_in22k, or fb_in22k); hf-hub:org/repo[:file]; an https:// URL; a local path "
        "(tune_xray.models.pretrained)")
    pretrained_ema: bool = Field(False, description="load a trainer file's EMA copy, not its state_dict / model")
    pretrained_path: Optional[str] = Field(None, description="a local .safetensors/.pth in timm key layout: "
                                           "model.pretrained set to a path, kept as its alias")
    compile: bool = Field(False, description="torch.compile the trained model (every phase)")
    grad_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward (timm's set_grad_checkpointing): "
        "a fraction of the memory for about a third more compute")
    scan_backend: Literal["auto", "kernel", "triton", "torch"] = Field(
        "auto", description="MambaVision/VMamba selective scan: mamba-ssm's kernel, our Triton kernel, or pure "
        "PyTorch; auto: the first of them that runs on the trial's device (a CUDA fallback to torch is warned)")
    in_chans: Literal[1, 3] = 3
    drop_rate: float = Field(0.0, ge=0, lt=1)
    init_from: Optional[str] = Field(
        None, description="fine-tune from an earlier search's SSL phase instead of pre-training: EXPERIMENT (the "
        "one with the best final probe) or EXPERIMENT:tNNN (that trial's); `python -m tune_xray.phases.ssl_store "
        "EXPERIMENT` lists them, best first")

    @model_validator(mode="after")
    def _one_pretrained(self):
        """`pretrained_path` is `pretrained` set to a local path: folded into it (one field read everywhere)."""
        if self.pretrained_path is None:
            return self
        if self.pretrained not in (False, self.pretrained_path):
            raise ValueError(f"model.pretrained_path={self.pretrained_path!r} and model.pretrained="
                             f"{self.pretrained!r}: set one (pretrained_path is model.pretrained with a path)")
        object.__setattr__(self, "pretrained", self.pretrained_path)
        return self


class OptimizerConfig(_Strict):
    """Passed to timm.optim.create_optimizer_v2. S0 LARS: lr 0.2, wd 1.5e-6, momentum 0, trust 0.001."""

    name: Literal["sgd", "adamw", "adam", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    trust_coeff: float = Field(0.001, gt=0, description="LARS only")


class SchedulerConfig(_Strict):
    """Per-epoch LR schedule through timm.scheduler (cosine stays at eta_min after t_max; S0 flaw 6)."""

    name: Literal["none", "step", "plateau", "cosine", "restarts", "warmup_cosine"] = "none"
    t_max: int = Field(250, ge=1, description="cosine / warmup_cosine length in epochs")
    eta_min: float = Field(1e-6, ge=0)
    step_size: int = Field(25, ge=1)
    gamma: float = Field(0.5, gt=0, le=1, description="step and plateau decay factor")
    patience: int = Field(10, ge=0, description="plateau patience in epochs")
    plateau_metric: Literal["val_loss", "val_mean_auroc", "val_accuracy", "val_macro_f1"] = "val_loss"
    t_0: int = Field(25, ge=1, description="restarts: epochs per cycle")
    warmup_epochs: int = Field(10, ge=0)


def positive_limits(limits: dict) -> dict:
    """Hard limits on a trial's measured cost (a study's `limits:`), each positive."""
    bad = {k: v for k, v in limits.items() if not v > 0}
    if bad:
        raise ValueError(f"{bad}: each limit is a positive cost (latency_ms: ms per image at batch 1, params_m: M "
                         "parameters, gflops: GFLOPs per image)")
    return limits


def over_limits(measured: dict, limits: dict) -> str:
    """What in `measured` (costs) exceeds `limits`, in words ("latency_ms 4.2 over its limit 3"); "" when none
    does."""
    return "; ".join(f"{k} {measured[k]:.3g} over its limit {limit:g}" for k, limit in limits.items()
                     if isinstance(measured.get(k), (int, float)) and measured[k] > limit)


class SupervisedConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step; all contribute")
    loss: Literal["auto", "bce", "ce", "focal"] = Field(
        "auto", description="auto: BCE (multi-label) or CE (multi-class); focal: α(1−p_t)^γ·BCE/CE")
    focal_alpha: float = Field(1.0, gt=0, description="focal loss factor (α = 1, γ = 0 is BCE/CE)")
    focal_gamma: float = Field(2.0, ge=0, description="focal loss focusing γ (Lin et al. 2017)")
    pos_weight: bool = Field(False, description="BCE pos_weight = n_neg / n_pos from the train split")
    class_weights: Literal["inverse", "none", "s1_count"] = Field(
        "inverse", description="single-label tasks: n/(K·n_c); none; or S1's n_c/n (reversed, to replicate S1)")
    undersample_majority: bool = Field(False, description="single-label: cut the largest class to the next one")
    freeze: Union[Literal["head_only"], float] = Field(
        0.0,
        description="share of the backbone's parameter groups frozen in depth order (S3: 0, 0.5, 0.75), or head_only")
    head_warmup_epochs: int = Field(0, ge=0, description="S0 stage 1: epochs training only the head first (S0: 3)")
    head_warmup_lr: float = Field(1e-3, gt=0, description="S0 stage 1 LR; stage 2 uses optimizer.lr (S0: 1e-4)")

    @model_validator(mode="after")
    def _freeze_share(self):
        if not isinstance(self.freeze, str) and not 0 <= self.freeze < 1:
            raise ValueError(f"freeze must be a share in [0, 1) or head_only, got {self.freeze}")
        return self

    @field_validator("limits")
    @classmethod
    def _limits(cls, limits: dict) -> dict:
        return positive_limits(limits)

    def over_limits(self, measured: dict) -> str:
        """What in `measured` (a trial's cost) exceeds its limits that a trial judges itself (JUDGED_IN_TRIAL: not
        its latency, measured on a device it may share), in words; "" when none does."""
        return over_limits(measured, {k: v for k, v in self.limits.items() if k in JUDGED_IN_TRIAL})
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    early_stopping_patience: Optional[int] = Field(10, ge=1, description="S0: 10 epochs on val mAUC")
    selection_metric: Literal["val_mean_auroc", "val_loss", "val_accuracy", "val_macro_f1"] = Field(
        "val_mean_auroc", description="model selection and early stopping; always a validation metric")
    threshold: Literal["youden", "f1"] = Field(
        "youden", description="multi-label and binary decision thresholds, chosen on val within [0.05, 0.95]")
    limits: dict[Literal[COSTS], float] = Field(  # type: ignore[valid-type]
        {}, description="hard limits on the model's measured cost (a study's `limits:`): a trial over a params_m or "
        "gflops limit stops at its first epoch's end as infeasible, told to Optuna's constraints, never a failure; a "
        "latency_ms limit is judged after the search on the model measured alone (a trial may share its device)")
    record_test: bool = Field(
        False, description="score the selected checkpoint on test in the run itself (record_test_* beside every "
        "trial: numbers a reader can sort and select on). Off: test predictions are stored for the search's one "
        "record at its end (ensemble, best single, top-K); the search's --record-test-per-trial turns it on")


class _SslPhase(_Strict):
    """What the self-supervised phases share: a plateau schedule can only watch their own validation loss."""

    _phase: ClassVar[str]

    @model_validator(mode="after")
    def _plateau_on_own_loss(self):
        if self.scheduler.name == "plateau" and self.scheduler.plateau_metric != "val_loss":
            raise ValueError(f"{self._phase}.scheduler.plateau_metric must be val_loss "
                             f"(the {self._phase.upper()} validation loss)")
        return self


class ByolConfig(_SslPhase):
    """BYOL (Grill et al. 2020) with S0's final recipe as defaults (LARS 0.2 at batch 256, H 1024)."""

    _phase: ClassVar[str] = "byol"
    enabled: bool = False
    labelled_only: bool = Field(False, description="pre-train on the labelled subset only (S1), not all of train")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=2)
    accum_steps: int = Field(1, ge=1)
    hidden_dim: int = Field(1024, ge=1)
    out_dim: int = Field(256, ge=1)
    ema_tau: float = Field(0.996, ge=0, le=1, description="base tau; cosine to 1 over the run's real steps")
    optimizer: OptimizerConfig = OptimizerConfig(name="lars", lr=0.2, weight_decay=1.5e-6, momentum=0.0)
    scheduler: SchedulerConfig = SchedulerConfig(name="cosine", t_max=250, eta_min=1e-6)


class CassConfig(_SslPhase):
    """CASS (Singh et al. 2022) with S1's recipe as defaults: ResNet-50 + ViT-B/16 on the same augmented batch,
    Adam 1e-3 each, cosine T_max 16, batch 16 (S1, the CASS study)."""

    _phase: ClassVar[str] = "cass"
    enabled: bool = False
    cnn: str = Field("resnet50", description="the CNN arm (any timm or own backbone)")
    transformer: str = Field("vit_base_patch16_384", description="the transformer arm")
    finetune: Literal["cnn", "transformer", "both"] = Field(
        "cnn", description="the arm fine-tuned afterwards, or both as a two-member ensemble")
    labelled_only: bool = Field(False, description="pre-train on the labelled subset only (S1), not all of train")
    out_dim: int = Field(1000, ge=1, description="shared output width both arms are projected to")
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=2)
    accum_steps: int = Field(1, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)
    scheduler: SchedulerConfig = SchedulerConfig(name="cosine", t_max=16, eta_min=1e-6)
    swa: bool = Field(False, description="stochastic weight averaging of both arms (S1's was a no-op)")
    swa_start: float = Field(0.75, ge=0, lt=1, description="share of the epochs before averaging starts")
    swa_lr: float = Field(1e-4, gt=0)


class SslConfig(_Strict):
    """What both self-supervised phases share: the representation probe (phases.probe: a weighted kNN on the frozen
    backbone, scored with the study's metric on validation) and the rules that end a collapsed phase at once."""

    probe_every: int = Field(1, ge=0, description="probe every N SSL epochs (and at the phase's last); 0: never")
    probe_images: int = Field(1000, ge=10, description="labelled train images the kNN looks up (stratified, fixed "
                              "by data.split_seed)")
    probe_k: int = Field(20, ge=1, description="neighbours (DINO's 20)")
    probe_temperature: float = Field(0.07, gt=0, description="neighbour weights exp(cos / T) (DINO's 0.07)")
    collapse_std: float = Field(
        0.05, ge=0, description="BYOL: collapsed when z_std·√out_dim (≈1 healthy, 0 collapsed; solo-learn's "
        "monitor) falls below this; 0: never")
    collapse_probes: int = Field(3, ge=0, description="collapsed after this many probes in a row at chance (mean "
                                 "AUROC ≤ 0.52); 0: never")


class TrialConfig(_Strict):
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="CUDA mixed precision: auto = bf16 where the GPU has it (Ampere+), else fp16 with a "
        "GradScaler; ignored on CPU")
    channels_last: bool = Field(True, description="NHWC images and weights on CUDA, in every phase; ignored on CPU")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, value):
        """`amp: true/false` (earlier configs) mean auto/off."""
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value
    deterministic: bool = Field(False, description="deterministic kernels only: an op without one is an error "
                                "naming it (torch.use_deterministic_algorithms), not a warning")
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    byol: ByolConfig = ByolConfig()
    cass: CassConfig = CassConfig()
    ssl: SslConfig = SslConfig()
    supervised: SupervisedConfig = SupervisedConfig()

    @model_validator(mode="after")
    def _one_ssl_phase(self):
        if self.byol.enabled and self.cass.enabled:
            raise ValueError("byol.enabled and cass.enabled: choose one self-supervised phase")
        if self.cass.enabled and not isinstance(self.model.pretrained, bool):
            raise ValueError(f"model.pretrained={self.model.pretrained!r} names weights of one backbone; with "
                             "cass.enabled the backbones trained are the CASS arms (cass.cnn, cass.transformer): "
                             "true (each arm's default timm weights, as S1) or false")
        return self

    @model_validator(mode="after")
    def _crop_fits_cache(self):
        if self.augment.crop == "random" and self.augment.image_size > self.data.cache_size:
            raise ValueError(f"augment.image_size {self.augment.image_size} exceeds data.cache_size "
                             f"{self.data.cache_size}: a random crop needs cache_size >= image_size")
        if self.augment.tta == "tencrop" and (self.augment.eval_view == "resize"
                                              or self.augment.image_size >= self.data.cache_size):
            raise ValueError(f"augment.tta=tencrop crops image_size {self.augment.image_size} from the "
                             f"{self.data.cache_size}-px cache: it needs augment.eval_view=center_crop (got "
                             f"{self.augment.eval_view}) and data.cache_size > image_size (S0: 224 from 256)")
        return self


def format_validation_errors(err: ValidationError, origin: str) -> str:
    """One line per error: the file (origin), the dotted key, and what was wrong (with the value if short)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-"))) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}'")
        else:
            got = repr(e.get("input"))
            lines.append(f"{origin}: {key}: {e['msg']}" + (f" (got {got})" if len(got) <= 60 else ""))
    return "\n".join(lines)


def nest(dotted: dict[str, Any], origin: str = "--set") -> dict:
    """`{"supervised.optimizer.lr": 1e-4}` → `{"supervised": {"optimizer": {"lr": 1e-4}}}`."""
    tree: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin} {key}: '{p}' is not a section")
        node[leaf] = value
    return tree


def parse_overrides(overrides: list[str]) -> dict:
    """`["supervised.optimizer.lr=1e-4", "byol.enabled=true"]` → nested dict (values parsed as YAML). A key the
    trial config does not have is one error saying it came from --set, with the nearest keys it does have."""
    dotted = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        dotted[key.strip()] = yaml.safe_load(raw)
    known = config_keys()
    for key in dotted:
        if key not in known and not any(key.startswith(k + ".") for k, section in known.items() if not section):
            near = difflib.get_close_matches(key, list(known), n=3, cutoff=0.8)
            section = key.rpartition(".")[0]
            siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
            hint = (f"; did you mean {' or '.join(near)}?" if near else
                    f"; {section or 'the config'} has {', '.join(siblings)}" if siblings else "")
            raise ConfigError(f"--set {key}: unknown key{hint} (every key: python -m tune_xray.train --print-config)")
    return nest(dotted)


@functools.cache
def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of the trial config → whether it is a section (a sub-model) rather than a value."""
    out = {}
    for name, field in (model or TrialConfig).model_fields.items():
        inner = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type)
                 and issubclass(t, BaseModel)]
        out[prefix + name] = bool(inner)
        if inner:
            out.update(config_keys(inner[0], f"{prefix}{name}."))
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(tree: dict, origin: str = "config") -> TrialConfig:
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err, origin)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrialConfig:
    """Read a YAML config (or the defaults) and apply `--set key=value` overrides; validate once."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    if overrides:
        tree = merge(tree, parse_overrides(list(overrides)))
        origin += " + --set"
    return build_config(tree, origin)


def metric_mode(metric: str) -> str:
    """Losses are minimised, every other metric maximised."""
    return "min" if metric.endswith("loss") else "max"


def objective(metric: str) -> str:
    """`val_mean_auroc` → `best_val_mean_auroc`: a run's best value so far of its selection metric, what the
    searcher and ASHA read."""
    return f"best_{metric}"


