"""MambaVision (Hatamizadeh & Kautz, CVPR 2025, arXiv:2407.08083) in timm's registry: `mambavision_t`, `_t2`,
`_s`, `_b`, `_l`, `_l2`.

Hierarchical: a two-conv stem (stride 4), two stages of residual conv blocks, then two stages of windowed
token blocks whose first half mixes with the MambaVision mixer (a non-causal selective-scan branch beside a
conv branch, concatenated) and whose second half with self-attention. Sizes, windows and layer scale follow
the paper's Table 1 / the NVlabs release; parameter names match the official checkpoints, so their
`.pth.tar` files load with `model.pretrained`. The scan is `scan.selective_scan` (mamba-ssm's kernel when
installed, the chunked PyTorch scan otherwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import checkpoint, generate_default_cfgs, register_model
from torch import nn

from .heads import nested_no_weight_decay
from .scan import build_ssm_model, selective_scan


class Stem(nn.Module):
    """Two 3×3 stride-2 convs with BN + ReLU: 224 px → 56² tokens."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(in_dim, eps=1e-4), nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim, eps=1e-4), nn.ReLU())

    def forward(self, x):
        return self.conv_down(x)


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x):
        return self.reduction(x)


class ConvBlock(nn.Module):
    """Stages 1–2: conv-BN-GELU-conv-BN with a residual."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2, self.norm2 = nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))))


class MambaVisionMixer(nn.Module):
    """The paper's mixer (Sec. 3.2): half the channels through conv → SiLU → selective scan, half through
    conv → SiLU only (no gating), concatenated and projected. Convs are 'same'-padded, not causal, since an
    image has no time order. d_state 8, kernel 3, expand 1 as released."""

    def __init__(self, dim: int, d_state: int = 8, d_conv: int = 3, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        half, self.dt_rank, self.d_state = dim // 2, math.ceil(dim / 16), d_state
        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():  # softplus(bias) = dt ∈ [dt_min, dt_max] (Mamba's Δ initialisation)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(half, 1))  # S4D-real
        self.D = nn.Parameter(torch.ones(half))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False, padding="same")
        self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False, padding="same")
        self.scan_backend = "auto"  # scan.set_scan_backend

    def forward(self, tokens):  # (batch, L, dim)
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)
        x, z = F.silu(self.conv1d_x(x)), F.silu(self.conv1d_z(z))
        # (c, D)·(batch, D, L) on x as it is: nn.Linear on x.transpose(1, 2) kept a copy of x for backward
        dt, B, C = torch.matmul(self.x_proj.weight[None], x).split([self.dt_rank, self.d_state, self.d_state], dim=1)
        # the release adds dt_proj's bias twice (in dt_proj and as the scan's delta_bias); its weights were
        # trained so, and the official checkpoints only reproduce with it: Δ = softplus(W·dt + 2·bias)
        y = selective_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(),
                           delta_bias=2 * self.dt_proj.bias.float(), delta_softplus=True,
                           delta_proj_weight=self.dt_proj.weight, backend=self.scan_backend)
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm token block: mixer (MambaVision mixer or attention) + MLP, each with optional layer scale."""

    def __init__(self, dim: int, num_heads: int, attention: bool, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Attention(dim, num_heads) if attention else MambaVisionMixer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None

    def forward(self, x):
        mixed = self.mixer(self.norm1(x))
        x = x + self.drop_path(mixed if self.gamma_1 is None else self.gamma_1 * mixed)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma_2 is None else self.gamma_2 * mlp)


class Level(nn.Module):
    """One stage. Token stages run on non-overlapping windows (padded to a multiple of the window); their
    last ⌈depth/2⌉ blocks (⌊depth/2⌋ when depth is odd) use attention, the first ones the mixer."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, conv: bool, downsample: bool,
                 drop_path: list[float], mlp_ratio: float, layer_scale: float | None):
        super().__init__()
        self.conv, self.window, self.grad_checkpointing = conv, window, False
        if conv:
            self.blocks = nn.ModuleList(ConvBlock(dim, drop_path[i]) for i in range(depth))
        else:
            first_attention = depth // 2 + 1 if depth % 2 else depth // 2
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, i >= first_attention, mlp_ratio, drop_path[i], layer_scale) for i in range(depth))
        self.downsample = Downsample(dim) if downsample else None

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)

    def forward(self, x):
        if self.conv:
            for block in self.blocks:
                x = self._run(block, x)
        else:
            batch, dim, height, width = x.shape
            w = self.window
            x = F.pad(x, (0, -width % w, 0, -height % w))
            hp, wp = x.shape[-2:]
            tokens = x.view(batch, dim, hp // w, w, wp // w, w).permute(0, 2, 4, 3, 5, 1).reshape(-1, w * w, dim)
            for block in self.blocks:
                tokens = self._run(block, tokens)
            x = tokens.view(batch, hp // w, wp // w, w, w, dim).permute(0, 5, 1, 3, 2, 4).reshape(batch, dim, hp, wp)
            x = x[:, :, :height, :width].contiguous()
        return x if self.downsample is None else self.downsample(x)


class MambaVision(nn.Module):
    def __init__(self, depths, num_heads, window_size, dim, in_dim, mlp_ratio=4.0, drop_path_rate=0.2,
                 layer_scale=None, in_chans=3, num_classes=1000, global_pool="avg", drop_rate=0.0):
        super().__init__()
        assert global_pool in ("avg", ""), "MambaVision pools by average (or not at all: global_pool='')"
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.num_features = self.head_hidden_size = dim * 2 ** (len(depths) - 1)
        self.patch_embed = Stem(in_chans, in_dim, dim)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # stochastic depth
        self.levels = nn.Sequential()
        self.feature_info = []
        for i, depth in enumerate(depths):
            self.levels.append(Level(dim * 2 ** i, depth, num_heads[i], window_size[i], conv=i < 2,
                                     downsample=i < len(depths) - 1,
                                     drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                                     mlp_ratio=mlp_ratio, layer_scale=layer_scale))
            channels = dim * 2 ** min(i + 1, len(depths) - 1)  # a level ends with its downsample
            self.feature_info.append(dict(num_chs=channels, reduction=4 * 2 ** min(i + 1, len(depths) - 1),
                                          module=f"levels.{i}"))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return nested_no_weight_decay(self)  # A_log and D, by their full names (timm's mechanism)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's parameter groups in depth order (layer-wise LR decay, freezing): stem, stages, final norm."""
        return dict(stem=r"^patch_embed", blocks=[(r"^levels\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: each block recomputes its activations in backward instead of keeping them."""
        for level in self.levels:
            level.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        """The last stage's normalised feature map, (batch, num_features, H/32, W/32): for pooling or Grad-CAM."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.conv_down.0", "classifier": "head", "license": "nvidia-source-code", **kwargs}


def _nvidia(repo: str, filename: str, **kwargs):
    """NVIDIA's release of a MambaVision size on the Hugging Face hub (github.com/NVlabs/MambaVision, its model
    table): the trainer's `.pth.tar`, read by `models.pretrained.read_checkpoint`."""
    return _cfg(hf_hub_id=f"nvidia/{repo}", hf_hub_filename=filename, **kwargs)


default_cfgs = generate_default_cfgs({
    "mambavision_t.in1k": _nvidia("MambaVision-T-1K", "mambavision_tiny_1k.pth.tar"),
    "mambavision_t2.in1k": _nvidia("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", crop_pct=0.98),
    "mambavision_s.in1k": _nvidia("MambaVision-S-1K", "mambavision_small_1k.pth.tar", crop_pct=0.93),
    "mambavision_b.in1k": _nvidia("MambaVision-B-1K", "mambavision_base_1k.pth.tar"),
    # ImageNet-21K pretraining, fine-tuned on ImageNet-1K at 224 (the release's "-21K" models)
    "mambavision_b.in21k": _nvidia("MambaVision-B-21K", "mambavision_base_21k.pth.tar"),
    "mambavision_l.in1k": _nvidia("MambaVision-L-1K", "mambavision_large_1k.pth.tar"),
    "mambavision_l.in21k": _nvidia("MambaVision-L-21K", "mambavision_large_21k.pth.tar"),
    "mambavision_l2.in1k": _nvidia("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar"),
    "test_mambavision": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),  # no weights: trained from scratch
})

# Table 1 of the paper / the NVlabs release: every size has 4 stages, windows (8, 8, 14, 7), MLP ratio 4.
SIZES = {
    "mambavision_t": dict(depths=(1, 3, 8, 4), num_heads=(2, 4, 8, 16), dim=80, in_dim=32, drop_path_rate=0.2),
    "mambavision_t2": dict(depths=(1, 3, 11, 4), num_heads=(2, 4, 8, 16), dim=80, in_dim=32, drop_path_rate=0.2),
    "mambavision_s": dict(depths=(3, 3, 7, 5), num_heads=(2, 4, 8, 16), dim=96, in_dim=64, drop_path_rate=0.2),
    "mambavision_b": dict(depths=(3, 3, 10, 5), num_heads=(2, 4, 8, 16), dim=128, in_dim=64, drop_path_rate=0.3,
                          layer_scale=1e-5),
    "mambavision_l": dict(depths=(3, 3, 10, 5), num_heads=(4, 8, 16, 32), dim=196, in_dim=64, drop_path_rate=0.3,
                          layer_scale=1e-5),
    "mambavision_l2": dict(depths=(3, 3, 12, 5), num_heads=(4, 8, 16, 32), dim=196, in_dim=64, drop_path_rate=0.3,
                           layer_scale=1e-5),
    # for tests and --smoke, like timm's test_* models: every kind of block, ≈0.1 M parameters
    "test_mambavision": dict(depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2), dim=16, in_dim=8, drop_path_rate=0.0,
                             window_size=(4, 4, 4, 2)),
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> MambaVision:
    args = {"window_size": (8, 8, 14, 7), **SIZES[variant], **kwargs}
    return build_ssm_model(MambaVision, variant, pretrained, **args)


@register_model
def mambavision_t(pretrained=False, **kwargs):
    return _create("mambavision_t", pretrained, **kwargs)


@register_model
def mambavision_t2(pretrained=False, **kwargs):
    return _create("mambavision_t2", pretrained, **kwargs)


@register_model
def mambavision_s(pretrained=False, **kwargs):
    return _create("mambavision_s", pretrained, **kwargs)


@register_model
def mambavision_b(pretrained=False, **kwargs):
    return _create("mambavision_b", pretrained, **kwargs)


@register_model
def mambavision_l(pretrained=False, **kwargs):
    return _create("mambavision_l", pretrained, **kwargs)


@register_model
def mambavision_l2(pretrained=False, **kwargs):
    return _create("mambavision_l2", pretrained, **kwargs)


@register_model
def test_mambavision(pretrained=False, **kwargs):
    return _create("test_mambavision", pretrained, **kwargs)
