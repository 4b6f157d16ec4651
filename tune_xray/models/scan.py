"""Mamba's selective scan (Gu & Dao 2023, Alg. 2) with mamba-ssm's signature: its fused CUDA kernel when
mamba-ssm is installed and the tensors are on CUDA, otherwise an exact pure-PyTorch chunked scan.

The recurrence, per channel d and state n:  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,   y_t = C_t·h_t + D u_t.

Chunked scan: inside a chunk of T steps, with S_t the running sum of ΔA (≤ 0), h_t = e^{S_t} (h_0 +
Σ_{s≤t} e^{-S_s} Δ_s B_s u_s) is an exp, a reciprocal and a cumsum over the whole tensor, all chunks at once;
only the state carried from chunk to chunk is a Python loop, over L/T chunk ends. e^{-S} overflows fp32 once
-S > 88 (STACK_NOTES: NaN at chunk 49, N 16), so T is chosen from the data: T·max|ΔA| ≤ _LOG_RANGE. Where
that leaves chunks shorter than _MIN_CHUNK (steep decays: one large Δ anywhere in the batch), a log-step scan
(Hillis & Steele 1986) multiplies decays instead of dividing by them, which no decay can overflow. Both are
exact: they match the step-by-step loop to fp32 rounding.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_LOG_RANGE = 60.0  # largest -S inside a chunk: e^60 ≈ 1e26 leaves fp32 headroom for the cumsum
_MIN_CHUNK = 4  # below this the log-step scan is faster (scripts/bench_scan.py, steep decays)
_MAX_CHUNK = 256


@functools.cache
def _kernel():
    """mamba-ssm's fused selective scan, or None when it is not installed (the CPU/CI case: silent)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a build without its CUDA extension
        return None
    return selective_scan_fn


def scan_backend() -> str:
    """Which path a model's SSM layers take: said once in the log when an SSM backbone is built."""
    if _kernel() is not None:
        return "mamba-ssm CUDA kernel on CUDA tensors, pure-PyTorch chunked scan elsewhere"
    return "pure-PyTorch chunked scan (mamba-ssm not installed)"


def build_ssm_model(model_cls, variant: str, pretrained: bool, **kwargs):
    """A timm entry point's body for our SSM backbones: weights come from local files only (no hub at run
    time), and the log says which scan path the model takes."""
    from timm.models import build_model_with_cfg

    if pretrained:
        raise ValueError(f"{variant}: no hub at run time; load a local file with model.pretrained_path")
    log.info("%s: selective scan = %s", variant, scan_backend())
    return build_model_with_cfg(model_cls, variant, False, feature_cfg=dict(flatten_sequential=True), **kwargs)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False):
    """y = selective_scan(u, Δ, A, B, C, D, z, Δ_bias, softplus) with mamba-ssm's shapes.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L), (batch, groups, N, L) with dim divisible
    by groups (VMamba's four scan directions), or (dim, N) for a time-invariant B/C; D, delta_bias: (dim,).
    Returns y (batch, dim, L) in u's dtype, and the last state (batch, dim, N) if `return_last_state`.
    """
    kernel = _kernel()
    if kernel is not None and u.is_cuda:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _chunk_for(delta: torch.Tensor, A: torch.Tensor) -> Optional[int]:
    """The chunk length for Δ (batch, dim, L) and A (dim, N), or None for the log-step scan (steep decays).

    T·max|ΔA| ≤ _LOG_RANGE, with max|ΔA| bounded from the small tensors: max_d (max |Δ_d|)(max |A_d|). Then
    the largest divisor of L up to that (no padding; window and feature-map lengths such as 196 or 3136 have
    good ones), else the shortest even split, whose tail is padded.
    """
    length = delta.shape[-1]
    with torch.no_grad():
        steepest = float((delta.abs().amax((0, 2)) * A.abs().amax(1)).amax()) if delta.numel() else 0.0
    longest = min(_MAX_CHUNK, length, int(_LOG_RANGE / steepest) if steepest > 0 else length)
    if longest < _MIN_CHUNK:
        return None if longest < length else length
    divisor = max(t for t in range(1, longest + 1) if length % t == 0)
    return divisor if 2 * divisor >= longest else math.ceil(length / math.ceil(length / longest))


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ_{s≥t} x_s along the last dim (torch has no reverse cumsum): a matmul with a triangle of ones for
    short chunks, flip-cumsum-flip for long ones (the faster of the two on a 2-core CPU, T ≤ 64 vs more)."""
    length = x.shape[-1]
    if length <= 64:
        return torch.matmul(x, torch.ones(length, length, dtype=x.dtype, device=x.device).tril())
    return x.flip(-1).cumsum_(-1).flip(-1)


def _log_step_scan(decay: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = decay_t h_{t-1} + x_t along the last dim from h_0 = 0, in log2(L) steps (Hillis & Steele 1986):
    only products of decays ≤ 1, so no decay is too steep for it."""
    h, step = x.clone(), 1
    while step < x.shape[-1]:
        h[..., step:] += decay[..., step:] * h[..., :-step]  # the product is a new tensor: no aliasing
        if 2 * step < x.shape[-1]:
            decay = torch.cat([decay[..., :step], decay[..., step:] * decay[..., :-step]], -1)
        step *= 2
    return h


class _Recurrence(torch.autograd.Function):
    """h_t = e^{Δ_t A} h_{t-1} + x_t over (batch, dim, N, L) from h_0 = 0, with a hand-written backward.

    With `chunk`: chunk by chunk as the module says. S = A · cumsum(Δ) is one broadcast product, as A does
    not vary with time, so the cumsum runs on the N-times smaller Δ; chunks start from a zero state, and the
    states carried between them are a short recurrence over chunk ends added in one pass. Without: the
    log-step scan. The adjoint λ_t = ∂L/∂h_t + e^{Δ_{t+1} A} λ_{t+1} is the same scan run backwards
    (e^{-S_t} Σ_{s≥t} e^{S_s} g_s in a chunk), ∂L/∂x = λ, and ∂L/∂(Δ_t A) = λ_t (h_t − x_t), as
    e^{Δ_t A} h_{t-1} = h_t − x_t: no shifted copy of h."""

    @staticmethod
    def forward(ctx, delta, A, x, chunk):
        batch, dim, n, length = x.shape
        ctx.chunk = chunk
        if chunk is None:
            decay = torch.exp(delta[:, :, None] * A[:, :, None])
            h = _log_step_scan(decay, x)
            ctx.save_for_backward(delta, A, x, h, decay, None)
            return h
        shape = (batch, dim, n, length // chunk, chunk)
        inv = torch.mul(delta.view(batch, dim, 1, *shape[-2:]).cumsum(-1), A.neg()[:, :, None, None]).exp_()
        decay = inv.reciprocal()  # inv = e^{-S} ≤ e^{_LOG_RANGE}, decay = e^{S}
        h = torch.mul(inv, x.view(shape)).cumsum_(-1).mul_(decay)  # each chunk from a zero state
        if shape[-2] > 1:  # plus the state carried in
            carried = torch.zeros_like(h[..., 0])
            for c in range(1, shape[-2]):
                carried[..., c] = h[..., c - 1, -1] + decay[..., c - 1, -1] * carried[..., c - 1]
            h.addcmul_(decay, carried[..., None])
        ctx.save_for_backward(delta, A, x, h, decay, inv)
        return h.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        delta, A, x, h, decay, inv = ctx.saved_tensors
        if ctx.chunk is None:  # λ_t = g_t + decay_{t+1} λ_{t+1}: the scan on reversed time
            decay_next = F.pad(decay.flip(-1)[..., :-1], (1, 0))
            lam = _log_step_scan(decay_next, grad_h.flip(-1)).flip(-1)
        else:
            lam = _suffix_sum(decay * grad_h.reshape(decay.shape)).mul_(inv)
            if decay.shape[-2] > 1:  # plus the adjoint carried back from the next chunk
                carried, ends = torch.zeros_like(lam[..., 0]), decay[..., -1]
                for c in range(decay.shape[-2] - 2, -1, -1):
                    carried[..., c] = ends[..., c] * (decay[..., c + 1, 0] * lam[..., c + 1, 0] + carried[..., c + 1])
                lam.addcmul_(inv, carried[..., None])
            lam = lam.view(x.shape)
        grad_dA = (h.view(x.shape) - x).mul_(lam)
        if A.shape[1] == 1:  # N = 1 (VMamba): products, as batched 1×1 matmuls are slow
            grad_delta = grad_dA[:, :, 0] * A
            grad_A = (grad_dA[:, :, 0] * delta).sum((0, 2))[:, None]
        else:
            grad_delta = torch.matmul(A[:, None, :], grad_dA).squeeze(2)  # Σ_n A_n ∂L/∂(ΔA)_n
            grad_A = torch.matmul(grad_dA, delta[..., None]).sum(0).squeeze(-1)  # Σ_{batch, t} Δ_t ∂L/∂(ΔA)_t
        return grad_delta, grad_A, lam, None


def _grouped(x: torch.Tensor, batch: int, dim: int) -> torch.Tensor:
    """B or C as a view broadcastable to (batch, groups, dim/groups, N, L): channels g·dim/groups … read
    group g (VMamba's four scan directions); one group when B/C is shared by every channel or fixed."""
    if x.dim() == 2:  # (dim, N): time-invariant
        return x.reshape(1, 1, dim, -1, 1)
    if x.dim() == 3:  # (batch, N, L)
        return x.reshape(batch, 1, 1, *x.shape[1:])
    return x.reshape(batch, x.shape[1], 1, *x.shape[2:])  # (batch, groups, N, L)


def _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The scan on (batch, dim, N, L) tensors: time last, so the cumsums run over contiguous memory."""
    dtype, (batch, dim, length) = u.dtype, u.shape
    u, delta, A = u.float(), delta.float(), A.float()
    B, C = _grouped(B.float(), batch, dim), _grouped(C.float(), batch, dim)
    groups = max(B.shape[1], C.shape[1])
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    chunk = _chunk_for(delta, A)
    x = ((delta * u).view(batch, groups, dim // groups, 1, length) * B).view(batch, dim, -1, length)
    pad = -length % chunk if chunk else 0  # padded steps: no decay, no input, the state passes unchanged
    if pad:
        delta, x = F.pad(delta, (0, pad)), F.pad(x, (0, pad))
    h = _Recurrence.apply(delta, A, x, chunk)[..., :length]

    y = (h.reshape(batch, groups, dim // groups, -1, length) * C).sum(3).view(batch, dim, length)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h[..., -1]) if return_last_state else y
