"""Backbones through timm's registry (`num_classes=0`: pooled features), started from the weights `model.pretrained`
names (`models.pretrained`: timm's pretrained configs, the hub's and torch.hub's caches). Importing this package
registers our MambaVision and VMamba (`mambavision_t` … `vmamba_b`, tiny `test_*` variants) with the official
releases as their pretrained configs.

A file is read by `pretrained.read_checkpoint` (no pickled code runs) and must fit the backbone exactly once its
classifier is dropped: the first conv is adapted when the file's input channels differ from `in_chans` (timm's
`adapt_input_conv`), and any other mismatch is an error naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from timm.models import adapt_input_conv
from torch import nn

from ..config import ConfigError
from . import mamba_vision, vmamba  # noqa: F401  (registers mambavision_* and vmamba_* in timm)
from .pretrained import WeightsError, fetch, read_checkpoint, resolve
from .scan import set_scan_backend

log = logging.getLogger(__name__)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", ())
    return tuple(n + "." for n in ([names] if isinstance(names, str) else names))


def load_pretrained(model: nn.Module, path: str | Path, in_chans: int, ema: bool = False) -> str:
    """Load a weights file into a `num_classes=0` timm backbone, its classifier dropped; returns which part of the
    file it loaded (a trainer file's `state_dict`, or its EMA copy with `ema`)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: pretrained weights file not found")
    state, part = read_checkpoint(path, ema)
    own = model.state_dict()
    for prefix in ("model.", "backbone."):  # exports that nest the network (e.g. MambaVision's HF release)
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_classifier_prefixes(model))}
    first_conv = model.pretrained_cfg.get("first_conv")
    if first_conv and f"{first_conv}.weight" in state:
        key = f"{first_conv}.weight"
        if state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key], base_chans=state[key].shape[1])
    shape_errors = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shape_errors or missing or unexpected:
        parts = []
        if shape_errors:
            parts.append(f"shape mismatch for {len(shape_errors)} key(s), e.g. {shape_errors[0]}")
        if missing:
            parts.append(f"{len(missing)} model key(s) missing from the file, e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) in the file, e.g. '{unexpected[0]}'")
        raise WeightsError(f"{path}: does not fit backbone '{model.pretrained_cfg.get('architecture')}': "
                           + "; ".join(parts))
    model.load_state_dict(state)
    return part


def create_backbone(name: str, pretrained=False, in_chans: int = 3, image_size: int | None = None,
                    key: str = "model.backbone", grad_checkpointing: bool = False, scan_backend: str = "auto",
                    ema: bool = False, **kwargs) -> tuple[nn.Module, int]:
    """A timm feature extractor and its feature width: `(module, num_features)`, started from the weights
    `pretrained` names (`pretrained.resolve`: false, true, a tag, hf-hub:, a URL or a path; fetched into the caches
    if missing; `ema`: a trainer file's EMA copy). Models built for one input size (ViT, Swin, CoAtNet, MaxViT:
    timm's `fixed_input_size`) are built for `image_size`.

    `grad_checkpointing`: timm's `set_grad_checkpointing` (a model without it is a ConfigError); `scan_backend`:
    the selective scan of MambaVision's and VMamba's SSM layers (auto | kernel | triton | torch)."""
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"{key}: unknown timm model '{name}'" + (f"; similar: {close}" if close else ""))
    default = timm.models.get_pretrained_cfg(name.split(".")[0])
    if image_size and default is not None and default.fixed_input_size and default.input_size[-1] != image_size:
        kwargs.setdefault("img_size", image_size)
    weight = resolve(name, pretrained)
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if weight is not None:
        part = load_pretrained(model, fetch(weight), in_chans, ema)
        log.info("%s: started from %s (%s)", name, weight.name, part)
    if grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, AttributeError, NotImplementedError):
            raise ConfigError(f"model.grad_checkpointing: {key} '{name}' does not support gradient checkpointing "
                              "(timm's set_grad_checkpointing)") from None
    set_scan_backend(model, scan_backend)
    return model, model.num_features


def uses_selective_scan(name: str) -> bool:
    """Whether a timm model name is one of our SSM backbones (MambaVision, VMamba), whose layers run the scan."""
    name = name.split(".")[0]
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ in (mamba_vision.__name__,
                                                                                     vmamba.__name__)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["create_backbone", "load_pretrained", "WeightsError", "param_count", "uses_selective_scan"]
