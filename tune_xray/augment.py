"""Augmentation on the batch's device with kornia: uint8 cache batches in, normalised float views out.

Every random parameter is drawn per image (kornia's `same_on_batch=False`), so a Gaussian blur with p 0.5
blurs about half of each batch — S0 decided it once when building the pipeline (SEEDS.md, flaw 5).
Brightness and contrast use torchvision's definitions (multiplicative; blend with the image mean) as S0
did, not kornia's additive defaults.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from kornia.enhance import adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction
from torch import nn

from .config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomBrightness(K.RandomBrightness):
    """torchvision brightness: x · f, f ~ U(range) per image."""

    def apply_transform(self, input, params, flags, transform=None):
        factor = params["brightness_factor"].to(input)
        return adjust_brightness_accumulative(input, factor)


class RandomContrast(K.RandomContrast):
    """torchvision contrast: f · x + (1 − f) · mean(x), f ~ U(range) per image."""

    def apply_transform(self, input, params, flags, transform=None):
        factor = params["contrast_factor"].to(input)
        return adjust_contrast_with_mean_subtraction(input, factor).clamp(0, 1)


def normalization(cfg: AugmentConfig, in_chans: int, stats: tuple[list[float], list[float]] | None = None):
    """(mean, std) for the model's input channels: ImageNet's, the dataset's, or identity."""
    if cfg.normalize == "none":
        return [0.0] * in_chans, [1.0] * in_chans
    if cfg.normalize == "dataset":
        if stats is None:
            raise ValueError("augment.normalize=dataset needs the training split's pixel statistics")
        mean, std = stats
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if in_chans != len(mean):  # grayscale model with RGB stats or vice versa: use the channel average
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


class _Views(nn.Module):
    """Shared tail: uint8 → [0, 1], channel replication to the model's in_chans, normalisation."""

    def __init__(self, in_chans: int, mean, std):
        super().__init__()
        self.in_chans = in_chans
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))

    @staticmethod
    def to_unit(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        return self.normalize(x.contiguous())


class TrainAugment(_Views):
    """The training view (also each BYOL/CASS view: call it twice for two independent draws)."""

    def __init__(self, cfg: AugmentConfig, cache_size: int, in_chans: int, mean, std):
        super().__init__(in_chans, mean, std)
        s = cfg.image_size
        ops: list[nn.Module] = []
        if cfg.crop == "random":
            if s > cache_size:
                raise ValueError(f"augment.image_size {s} exceeds data.cache_size {cache_size} for crop=random")
            if s < cache_size:
                ops.append(K.RandomCrop((s, s)))
        elif cfg.crop == "random_resized":
            ops.append(K.RandomResizedCrop((s, s), scale=cfg.crop_scale))
        elif s != cache_size:
            ops.append(K.Resize((s, s)))
        if cfg.hflip:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.vflip:
            ops.append(K.RandomVerticalFlip(p=cfg.vflip))
        if cfg.rotation:
            ops.append(K.RandomRotation(cfg.rotation, p=1.0))
        if cfg.affine_p:
            ops.append(K.RandomAffine(cfg.affine_degrees, translate=(cfg.affine_translate,) * 2,
                                      scale=cfg.affine_scale, p=cfg.affine_p))
        if cfg.perspective_p:
            ops.append(K.RandomPerspective(cfg.perspective_scale, p=cfg.perspective_p))
        if cfg.brightness:
            ops.append(RandomBrightness(cfg.brightness, p=1.0))
        if cfg.contrast:
            ops.append(RandomContrast(cfg.contrast, p=1.0))
        if cfg.sharpness_p:
            ops.append(K.RandomSharpness(cfg.sharpness, p=cfg.sharpness_p))
        if cfg.autocontrast_p:
            ops.append(K.RandomAutoContrast(p=cfg.autocontrast_p))
        ops += [K.RandomErasing(scale=cfg.erasing_scale, p=cfg.erasing_p) for _ in range(cfg.erasing)]
        if cfg.blur_p:
            ops.append(K.RandomGaussianBlur((cfg.blur_kernel,) * 2, cfg.blur_sigma, p=cfg.blur_p))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.ops(self.to_unit(x)))


class EvalViews(_Views):
    """Deterministic evaluation views: one centre/resized view, or TTA views whose logits are averaged.

    `tencrop` is S0's TTA: the four corners and the centre at image_size, and their horizontal flips.
    """

    def __init__(self, cfg: AugmentConfig, cache_size: int, in_chans: int, mean, std):
        super().__init__(in_chans, mean, std)
        self.size, self.cache_size, self.tta = cfg.image_size, cache_size, cfg.tta
        if cfg.eval_view == "resize" or cfg.image_size > cache_size:
            self.view = K.Resize((cfg.image_size,) * 2)
        else:
            self.view = K.CenterCrop(cfg.image_size)

    def _crops(self, x: torch.Tensor) -> list[torch.Tensor]:
        s, n = self.size, x.shape[-1]
        if s >= n:
            return [self.view(x)]
        o = n - s
        corners = [(0, 0), (0, o), (o, 0), (o, o)]
        return [x[..., i:i + s, j:j + s] for i, j in corners] + [self.view(x)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.to_unit(x)
        if self.tta == "tencrop":
            views = self._crops(x)
            views += [v.flip(-1) for v in views]
        else:
            views = [self.view(x)]
            if self.tta == "hflip":
                views.append(views[0].flip(-1))
        return [self.finish(v) for v in views]


def tta_logits(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the model's logits over the views (S0: mean of logits, then sigmoid)."""
    return torch.stack([model(v) for v in views]).mean(0)
