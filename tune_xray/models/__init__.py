"""Backbones through timm's registry (`num_classes=0`: pooled features), with local weights only. Importing
this package registers our MambaVision and VMamba (`mambavision_t` … `vmamba_b`, tiny `test_*` variants).

No hub is reachable at run time, so `pretrained=True` is never used: weights come from a local
`.safetensors` / `.pth` file in timm's key layout. The first conv is adapted when the file's input
channels differ from `in_chans` (timm's `adapt_input_conv`), and any other mismatch is an error.
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models import adapt_input_conv, clean_state_dict, load_state_dict
from torch import nn

from ..config import ConfigError
from . import mamba_vision, vmamba  # noqa: F401  (registers mambavision_* and vmamba_* in timm)
from .scan import set_scan_backend


class WeightsError(ValueError):
    """A pretrained file that is missing or does not fit the backbone; the message names both."""


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", ())
    return tuple(n + "." for n in ([names] if isinstance(names, str) else names))


def load_pretrained(model: nn.Module, path: str | Path, in_chans: int) -> None:
    """Load a local checkpoint into a `num_classes=0` timm backbone; classifier weights are dropped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: pretrained weights file not found")
    try:
        state = clean_state_dict(load_state_dict(str(path), use_ema=True))
    except Exception as err:  # pickle, safetensors and zip errors differ; all mean "unreadable"
        raise WeightsError(f"{path}: cannot read weights ({err})") from None
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


def create_backbone(name: str, pretrained_path: str | Path | None = None, in_chans: int = 3,
                    image_size: int | None = None, key: str = "model.backbone", grad_checkpointing: bool = False,
                    scan_backend: str = "auto", **kwargs) -> tuple[nn.Module, int]:
    """A timm feature extractor and its feature width: `(module, num_features)`. Models built for one input
    size (ViT, Swin, CoAtNet, MaxViT: timm's `fixed_input_size`) are built for `image_size`.

    `grad_checkpointing`: timm's `set_grad_checkpointing` (a model without it is a ConfigError); `scan_backend`:
    the selective scan of MambaVision's and VMamba's SSM layers (auto | kernel | triton | torch)."""
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"{key}: unknown timm model '{name}'" + (f"; similar: {close}" if close else ""))
    default = timm.models.get_pretrained_cfg(name.split(".")[0])
    if image_size and default is not None and default.fixed_input_size and default.input_size[-1] != image_size:
        kwargs.setdefault("img_size", image_size)
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if pretrained_path:
        load_pretrained(model, pretrained_path, in_chans)
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
