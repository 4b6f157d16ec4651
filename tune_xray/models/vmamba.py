"""VMamba (Liu et al., NeurIPS 2024, arXiv:2401.10166v4) in timm's registry: `vmamba_t`, `vmamba_s`, `vmamba_b`.

The paper's final (v2) models: a two-conv stem (stride 4), four stages of VSS blocks (SS2D + MLP, pre-norm)
with 3×3 stride-2 conv downsampling. SS2D projects, runs a depthwise 3×3 conv and SiLU, then scans the token
grid in four directions (rows, columns, and both reversed) with one selective scan each (d_state 1, no gate),
merges the four back onto the grid, normalises and projects out. Sizes T/S/B are the released v2 checkpoints
`vmamba_tiny_s1l8`, `vmamba_small_s2l15`, `vmamba_base_s2l15` (30 M / 50 M / 89 M in the release's table).
Parameter names and shapes match the official checkpoints, so they load with `model.pretrained`. Computed
channels-last.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from .heads import nested_no_weight_decay
from .scan import build_ssm_model, selective_scan

DIRECTIONS = 4


class Permute(nn.Module):
    def __init__(self, *order: int):
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(*self.order)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) → (B, 4, D, H·W): row-major, column-major, and both reversed."""
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The adjoint of cross_scan: (B, 4, D, H·W) → (B, D, H, W), the four directions summed on the grid."""
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    batch, dim, _ = rows.shape
    return rows.view(batch, dim, height, width) + cols.view(batch, dim, width, height).transpose(2, 3)


class SS2D(nn.Module):
    """2D selective scan (VMamba Sec. 4.2), the v2 'v05_noz' form: no z gate, LayerNorm on the merged output."""

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3,
                 dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.d_state, self.dt_rank = d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=False)
        bound = d_inner ** -0.5  # nn.Linear's default init, one projection per direction
        self.x_proj_weight = nn.Parameter(
            torch.empty(DIRECTIONS, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        rank_bound = self.dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(
            torch.empty(DIRECTIONS, d_inner, self.dt_rank).uniform_(-rank_bound, rank_bound))
        dt = torch.exp(torch.rand(DIRECTIONS, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹: Δ starts in [dt_min, dt_max]
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(DIRECTIONS * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(DIRECTIONS * d_inner))
        self.A_logs._no_weight_decay = self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.scan_backend = "auto"  # scan.set_scan_backend

    def forward(self, x):  # (B, H, W, C)
        batch, height, width, _ = x.shape
        x = F.silu(self.conv2d(self.in_proj(x).permute(0, 3, 1, 2)))
        xs = cross_scan(x)  # (B, K, D, L)
        # per direction (K, c, D)·(B, K, D, L): a batched matmul on xs as it is (an einsum copied it for batch > 1)
        dts, Bs, Cs = torch.matmul(self.x_proj_weight, xs).split([self.dt_rank, self.d_state, self.d_state], dim=2)
        ys = selective_scan(xs.flatten(1, 2), dts, -torch.exp(self.A_logs.float()), Bs, Cs, self.Ds.float(),
                            delta_bias=self.dt_projs_bias.flatten().float(), delta_softplus=True,
                            delta_proj_weight=self.dt_projs_weight, backend=self.scan_backend)
        y = cross_merge(ys.view_as(xs), height, width).permute(0, 2, 3, 1)
        return self.out_proj(self.out_norm(y))


class VSSBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 1, ssm_ratio: float = 1.0,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state, ssm_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _downsample(dim: int) -> nn.Sequential:
    """3×3 stride-2 conv + LayerNorm (the release's 'v3' downsample; indices match its checkpoints)."""
    return nn.Sequential(Permute(0, 3, 1, 2), nn.Conv2d(dim, 2 * dim, 3, 2, 1), Permute(0, 2, 3, 1),
                         nn.LayerNorm(2 * dim))


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


class VMamba(nn.Module):
    def __init__(self, depths, dim, d_state=1, ssm_ratio=1.0, mlp_ratio=4.0, drop_path_rate=0.2, in_chans=3,
                 num_classes=1000, global_pool="avg", drop_rate=0.0):
        super().__init__()
        assert global_pool in ("avg", ""), "VMamba pools by average (or not at all: global_pool='')"
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.grad_checkpointing = False
        dims = [dim * 2 ** i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = nn.Sequential(  # the release's 'v2' stem; indices match its checkpoints
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(dim // 2), Permute(0, 3, 1, 2),
            nn.GELU(), nn.Conv2d(dim // 2, dim, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(dim))
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # stochastic depth
        self.layers = nn.Sequential()
        self.feature_info = []
        for i, depth in enumerate(depths):
            last = i == len(depths) - 1
            blocks = [VSSBlock(dims[i], rates[sum(depths[:i]) + j], d_state, ssm_ratio, mlp_ratio)
                      for j in range(depth)]
            self.layers.append(nn.Sequential(OrderedDict(
                blocks=nn.Sequential(*blocks), downsample=nn.Identity() if last else _downsample(dims[i]))))
            self.feature_info.append(dict(num_chs=dims[min(i + 1, len(dims) - 1)],  # the stage's output, as called
                                          reduction=4 * 2 ** min(i + 1, len(dims) - 1),
                                          module=f"layers.{i}.downsample"))
        self.classifier = Classifier(self.num_features, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return nested_no_weight_decay(self)  # A_log and D, by their full names (timm's mechanism)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's parameter groups in depth order (layer-wise LR decay, freezing): stem, stages, final norm."""
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^classifier\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: each VSS block recomputes its activations in backward instead of keeping them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        """The last stage's normalised feature map, (batch, num_features, H/32, W/32): for pooling or Grad-CAM."""
        x = self.patch_embed(x)
        for layer in self.layers:
            checkpointed = self.grad_checkpointing and not torch.jit.is_scripting()
            x = layer.downsample(checkpoint_seq(layer.blocks, x) if checkpointed else layer.blocks(x))
        return self.classifier.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.0", "classifier": "classifier.head", "license": "mit", **kwargs}


_RELEASE = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"  # the authors' v2 classification files

default_cfgs = generate_default_cfgs({
    "vmamba_t.in1k": _cfg(url=_RELEASE + "vssm1_tiny_0230s_ckpt_epoch_264.pth"),  # T s1l8
    "vmamba_s.in1k": _cfg(url=_RELEASE + "vssm_small_0229_ckpt_epoch_222.pth"),  # S s2l15
    "vmamba_b.in1k": _cfg(url=_RELEASE + "vssm_base_0229_ckpt_epoch_237.pth"),  # B s2l15
    "test_vmamba": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),  # no weights: trained from scratch
})

SIZES = {  # the released v2 checkpoints: vmamba_tiny_s1l8, vmamba_small_s2l15, vmamba_base_s2l15
    "vmamba_t": dict(depths=(2, 2, 8, 2), dim=96, ssm_ratio=1.0, drop_path_rate=0.2),
    "vmamba_s": dict(depths=(2, 2, 15, 2), dim=96, ssm_ratio=2.0, drop_path_rate=0.3),
    "vmamba_b": dict(depths=(2, 2, 15, 2), dim=128, ssm_ratio=2.0, drop_path_rate=0.6),
    "test_vmamba": dict(depths=(1, 1, 2, 1), dim=16, drop_path_rate=0.0),  # tests and --smoke
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    return build_ssm_model(VMamba, variant, pretrained, **{**SIZES[variant], **kwargs})


@register_model
def vmamba_t(pretrained=False, **kwargs):
    return _create("vmamba_t", pretrained, **kwargs)


@register_model
def vmamba_s(pretrained=False, **kwargs):
    return _create("vmamba_s", pretrained, **kwargs)


@register_model
def vmamba_b(pretrained=False, **kwargs):
    return _create("vmamba_b", pretrained, **kwargs)


@register_model
def test_vmamba(pretrained=False, **kwargs):
    return _create("test_vmamba", pretrained, **kwargs)
