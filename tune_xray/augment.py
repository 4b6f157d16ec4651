"""Augmentation on the batch's device: uint8 cache batches in, normalised float views out.

Order (S0's): geometry (crop or resized crop, flips, rotation) → photometric (kornia: affine,
perspective, brightness, contrast, sharpness, autocontrast, Gaussian blur) → normalisation and channel
replication → random erasing ×N (after normalisation with fill 0, as torchvision's RandomErasing was used).

Every random parameter is drawn per image: a Gaussian blur with p 0.5 blurs about half of each batch
(S0 decided it once for the whole pipeline: flaw 5). Brightness and contrast follow torchvision
(multiplicative; blend with the image mean), not kornia's additive defaults.

Three steps are fused by hand because kornia's general path dominated the CPU profile (batch 64,
256 → 224, scripts/bench_data.py): crop + flips + rotation as one affine sampling per image (kornia's
separate crop/flip/rotation warps: ≈20 ms; fused: ≈5 ms), normalise + replicate to 3 channels in one
pass (kornia.Normalize on the replicated batch: ≈20 ms), and the erasing boxes (kornia: ≈7 ms each).
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import kornia.enhance as KE
import kornia.filters as KF
import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction
from torch import nn

from .config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomBrightness(K.RandomBrightness):
    """torchvision brightness: x · f, f ~ U(range) per image."""

    def apply_transform(self, input, params, flags, transform=None):
        return adjust_brightness_accumulative(input, params["brightness_factor"].to(input))


class RandomContrast(K.RandomContrast):
    """torchvision contrast: f · x + (1 − f) · mean(x), f ~ U(range) per image."""

    def apply_transform(self, input, params, flags, transform=None):
        return adjust_contrast_with_mean_subtraction(input, params["contrast_factor"].to(input)).clamp(0, 1)


class RandomGeometry(nn.Module):
    """Crop (fixed-size or resized), horizontal/vertical flip and rotation, composed into one affine map
    per image and sampled once.

    Same distribution as torchvision's RandomCrop / RandomResizedCrop (scale, ratio 3/4–4/3) →
    RandomHorizontalFlip / RandomVerticalFlip → RandomRotation(±degrees), including their defaults:
    a fixed-size crop is sampled nearest (exact pixels, and nearest rotation as torchvision's default),
    a resized crop bilinear; pixels rotated in from outside the crop are 0.
    """

    def __init__(self, size: int, crop: str = "random", scale=(0.08, 1.0), hflip: float = 0.0,
                 vflip: float = 0.0, degrees: float = 0.0):
        super().__init__()
        self.size, self.crop, self.scale = size, crop, scale
        self.hflip, self.vflip, self.degrees = hflip, vflip, degrees
        self.mode = "bilinear" if crop in ("random_resized", "none") else "nearest"

    def _boxes(self, n: int, side: int, device):
        """Per image crop box: width, height and top-left corner, in input pixels."""
        if self.crop == "random":
            w = h = torch.full((n,), float(self.size), device=device)
        elif self.crop == "random_resized":
            area = torch.empty(n, device=device).uniform_(*self.scale) * side * side
            log_ratio = torch.empty(n, device=device).uniform_(math.log(3 / 4), math.log(4 / 3))
            w = (area * log_ratio.exp()).sqrt().round().clamp(1, side)
            h = (area / log_ratio.exp()).sqrt().round().clamp(1, side)
        else:  # "none": the whole image, resized
            w = h = torch.full((n,), float(side), device=device)
        x0 = (torch.rand(n, device=device) * (side - w + 1)).floor()
        y0 = (torch.rand(n, device=device) * (side - h + 1)).floor()
        return w, h, x0, y0

    def sample(self, n: int, side: int, device) -> dict:
        """Per-image parameters: crop box (w, h, x0, y0 in input pixels), angle (radians), flip signs."""
        w, h, x0, y0 = self._boxes(n, side, device)
        theta = torch.empty(n, device=device).uniform_(-self.degrees, self.degrees) * (math.pi / 180)
        fx = torch.where(torch.rand(n, device=device) < self.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(n, device=device) < self.vflip, -1.0, 1.0)
        return {"w": w, "h": h, "x0": x0, "y0": y0, "theta": theta, "fx": fx, "fy": fy}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        n, s = x.shape[0], self.size
        if self.crop == "random":  # exact crop, one gather; then rotation's zero padding is the crop's edge
            offsets = torch.arange(s, device=x.device)
            rows, cols = params["y0"].long()[:, None] + offsets, params["x0"].long()[:, None] + offsets
            x = x[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channels last
            if not (self.degrees or self.hflip or self.vflip):
                return x
            params = {**params, "x0": torch.zeros_like(params["x0"]), "y0": torch.zeros_like(params["y0"])}
        side, dev = x.shape[-1], x.device
        col = lambda name: params[name].view(n, 1, 1).to(x.dtype)  # noqa: E731
        w, h, x0, y0, fx, fy = (col(k) for k in ("w", "h", "x0", "y0", "fx", "fy"))
        cos, sin = col("theta").cos(), -col("theta").sin()  # positive theta: counter-clockwise (torchvision)
        # output pixel (u, v), centred → inverse rotation (ru, rv) → flip → scale to the box → input pixel →
        # grid_sample's normalised coordinates (align_corners=False): (2·p + 1) / side − 1. Folded into
        # gx = A·u + B·v + C per image, so each grid coordinate is one full-size operation.
        c = (s - 1) / 2
        u = (torch.arange(s, device=dev, dtype=x.dtype) - c).view(1, 1, s)
        v = (torch.arange(s, device=dev, dtype=x.dtype) - c).view(1, s, 1)
        ax, ay = (2 / side) * fx * (w / s), (2 / side) * fy * (h / s)
        bx, by = (2 * (x0 + (w - 1) / 2) + 1) / side - 1, (2 * (y0 + (h - 1) / 2) + 1) / side - 1
        grid = torch.empty(n, s, s, 2, device=dev, dtype=x.dtype)
        torch.add((ax * cos) * u, (ax * sin) * v + bx, out=grid[..., 0])  # ru = cos·u + sin·v
        torch.add((-ay * sin) * u, (ay * cos) * v + by, out=grid[..., 1])  # rv = cos·v − sin·u
        if self.degrees and self.crop == "random_resized":  # rotated-in corners: zero, as torchvision fills
            ru, rv = cos * u + sin * v, cos * v - sin * u
            grid.masked_fill_(((ru.abs() > s / 2) | (rv.abs() > s / 2)).unsqueeze(-1), 2.0)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], x.shape[-1], x.device))


def random_erasing_(x: torch.Tensor, times: int, p: float, scale, ratio=(0.3, 3.3), value: float = 0.0):
    """torchvision RandomErasing applied `times` times independently, per image, in place.

    Each: with probability p, a box of area U(scale)·H·W and aspect U_log(ratio) is set to `value`. Drawn on x's
    device and applied as one mask: no host round trip and no kernel per box.
    """
    n, _, height, width = x.shape
    shape, device = (times, n, 1, 1), x.device
    apply = torch.rand(shape, device=device) < p
    area = torch.empty(shape, device=device).uniform_(*scale) * height * width
    aspect = torch.empty(shape, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    bh = (area * aspect).sqrt().round().clamp(1, height)
    bw = (area / aspect).sqrt().round().clamp(1, width)
    top = (torch.rand(shape, device=device) * (height - bh + 1)).floor()
    left = (torch.rand(shape, device=device) * (width - bw + 1)).floor()
    rows = torch.arange(height, device=device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, -1)
    boxes = apply & (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return x.masked_fill_(boxes.any(0)[:, None], value)


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


def preprocess(x: torch.Tensor, steps, clahe_clip: float = 2.0, clahe_grid: int = 8) -> torch.Tensor:
    """S4's fixed preprocessing on a [0, 1] batch, on its device: global histogram equalisation, CLAHE, and
    OpenCV's GaussianBlur((5, 5), 0) (σ = 0.3·((5 − 1)/2 − 1) + 0.8 = 1.1)."""
    for step in steps:
        if step == "equalize":
            x = KE.equalize(x)
        elif step == "clahe":
            x = KE.equalize_clahe(x, clip_limit=clahe_clip, grid_size=(clahe_grid, clahe_grid))
        else:
            x = KF.gaussian_blur2d(x, (5, 5), (1.1, 1.1), border_type="reflect")
    return x


class _Views(nn.Module):
    """Shared head and tail: uint8 → [0, 1] and the fixed preprocessing; then (x − mean) / std with
    replication to the model's in_chans."""

    def __init__(self, cfg: AugmentConfig, in_chans: int, mean, std):
        super().__init__()
        self.in_chans, self.mean, self.std = in_chans, list(mean), list(std)  # kept with a checkpoint (predict)
        self.steps, self.clahe = list(cfg.preprocess), (cfg.clahe_clip, cfg.clahe_grid)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std,
                             persistent=False)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return preprocess(x, self.steps, *self.clahe) if self.steps else x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans and x.shape[1] != 1:  # RGB data into a grayscale model
            x = x.mean(1, keepdim=True)
        return torch.addcmul(self.shift, x, self.scale)  # one pass; a 1-channel batch broadcasts to 3


class TrainAugment(_Views):
    """The training view (also each BYOL/CASS view: call it twice for two independent draws)."""

    def __init__(self, cfg: AugmentConfig, cache_size: int, in_chans: int, mean, std):
        super().__init__(cfg, in_chans, mean, std)
        s = cfg.image_size
        if cfg.crop == "random" and s > cache_size:
            raise ValueError(f"augment.image_size {s} exceeds data.cache_size {cache_size} for crop=random")
        self.cfg = cfg
        identity = cfg.crop != "random_resized" and s == cache_size and not (cfg.hflip or cfg.vflip or cfg.rotation)
        self.geometry = None if identity else RandomGeometry(s, cfg.crop, cfg.crop_scale, cfg.hflip, cfg.vflip,
                                                             cfg.rotation)
        ops: list[nn.Module] = []
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
        if cfg.blur_p:
            ops.append(K.RandomGaussianBlur((cfg.blur_kernel,) * 2, cfg.blur_sigma, p=cfg.blur_p))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_unit(x)
        if self.geometry is not None:
            x = self.geometry(x)
        x = self.finish(self.ops(x))
        if self.cfg.erasing:
            random_erasing_(x, self.cfg.erasing, self.cfg.erasing_p, self.cfg.erasing_scale)
        return x


class EvalViews(_Views):
    """Deterministic evaluation views: one centre/resized view, or TTA views whose logits are averaged.

    `tencrop` is S0's TTA: the four corners and the centre at image_size, and their horizontal flips; it needs
    a cache larger than the crop (TrialConfig checks it). The views' probabilities are averaged by the caller.
    """

    def __init__(self, cfg: AugmentConfig, cache_size: int, in_chans: int, mean, std):
        super().__init__(cfg, in_chans, mean, std)
        self.size, self.tta = cfg.image_size, cfg.tta
        self.resize = cfg.eval_view == "resize" or cfg.image_size > cache_size
        if self.tta == "tencrop" and (self.resize or cfg.image_size >= cache_size):
            raise ValueError(f"augment.tta=tencrop needs eval_view=center_crop and image_size < cache_size "
                             f"(got {cfg.eval_view}, {cfg.image_size} vs {cache_size})")

    def _crop(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        return x[..., top:top + self.size, left:left + self.size]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            return F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                 align_corners=False)
        o = (x.shape[-1] - self.size) // 2
        return self._crop(x, o, o)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.to_unit(x)
        if self.tta == "tencrop":
            o = x.shape[-1] - self.size
            views = [self._crop(x, top, left) for top, left in ((0, 0), (0, o), (o, 0), (o, o))] + [self.view(x)]
            views += [v.flip(-1) for v in views]
        else:
            views = [self.view(x)]
            if self.tta != "none":
                views.append(views[0].flip(-1))
        return [self.finish(v) for v in views]
