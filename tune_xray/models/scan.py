"""Mamba's selective scan (Gu & Dao 2023, Alg. 2) with mamba-ssm's signature: its fused CUDA kernel when
mamba-ssm is installed and the tensors are on CUDA, otherwise an exact pure-PyTorch chunked scan.

The recurrence, per channel d and state n:  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,   y_t = C_t·h_t + D u_t.

Chunked scan: inside a chunk of T steps, with S_t the running sum of ΔA (≤ 0), h_t = e^{S_t} (h_0 +
Σ_{s≤t} e^{-S_s} Δ_s B_s u_s) is two exps and a cumsum over the whole tensor, all chunks at once; only the
state carried from chunk to chunk is a Python loop (L/T steps instead of L). e^{-S} overflows fp32 once
-S > 88 (STACK_NOTES: NaN at chunk 49, N 16), so T is chosen from the data: T·max|ΔA| ≤ _LOG_RANGE. Inside
the scan a single step's ΔA is floored at -_DA_FLOOR: e^{-40} ≈ 4e-18 is far below fp32 resolution, so the
state it multiplies is already gone and the result is unchanged.
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
_DA_FLOOR = 40.0  # one step's decay e^{ΔA} ≥ e^{-40}: smaller is zero at fp32 resolution
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


def _per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C laid out as (batch, dim, N, L), broadcasting over what it does not vary with."""
    if x.dim() == 2:  # (dim, N): time-invariant
        return x[None, :, :, None]
    if x.dim() == 3:  # (batch, N, L): shared by every channel
        return x[:, None]
    groups = x.shape[1]  # (batch, groups, N, L): channels g·dim/groups … belong to group g
    return x.repeat_interleave(dim // groups, dim=1)


def _linear_scan(a: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """h_t = e^{a_t} h_{t-1} + x_t along the last dim from h_0 = 0, in chunks of `chunk` steps (no autograd)."""
    length = a.shape[-1]
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length
    if pad:  # zero decay and zero input: the padded steps leave the state as it was
        a, x = F.pad(a, (0, pad)), F.pad(x, (0, pad))
    shape = (*a.shape[:-1], n_chunks, chunk)
    S = a.reshape(shape).clamp(min=-_DA_FLOOR).cumsum(-1)  # S relative to the chunk's start
    decay = S.exp()
    h = S.neg_().exp_().mul_(x.reshape(shape)).cumsum_(-1).mul_(decay)  # from a zero state in each chunk
    for c in range(1, n_chunks):  # add the state carried in from the previous chunk
        h[..., c, :].addcmul_(decay[..., c, :], h[..., c - 1, -1:])
    return h.view(*shape[:-2], -1)[..., :length]


class _Recurrence(torch.autograd.Function):
    """h = linear_scan(a, x) with a hand-written backward: the adjoint λ_t = ∂L/∂h_t + e^{a_{t+1}} λ_{t+1}
    is the same recurrence run backwards in time, then ∂L/∂x = λ and ∂L/∂a_t = λ_t e^{a_t} h_{t-1}. Fewer
    full-size passes than autograd through the cumsums and exps, and no e^{-S} in the backward
    (MambaVision-T stage 3, fwd+bwd: 53 → 39 ms; scripts/bench_scan.py)."""

    @staticmethod
    def forward(ctx, a, x, chunk):
        h = _linear_scan(a, x, chunk)
        ctx.save_for_backward(a, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        a_next = F.pad(a[..., 1:], (0, 1))
        lam = _linear_scan(a_next.flip(-1), grad_h.flip(-1), ctx.chunk).flip(-1)
        h_prev = F.pad(h[..., :-1], (1, 0))
        return lam * a.exp() * h_prev, lam, None


def _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The scan on (batch, dim, N, L) tensors: time last, so the cumsums run over contiguous memory."""
    dtype = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dA = delta[:, :, None] * A[None, :, :, None]  # (batch, dim, N, L)
    dBu = (delta * u)[:, :, None] * _per_channel(B.float(), u.shape[1])
    with torch.no_grad():  # max |ΔA| bounded from the small tensors: max_d (max |Δ_d|)(max |A_d|), floored
        steepest = min(_DA_FLOOR, float((delta.abs().amax((0, 2)) * A.abs().amax(1)).amax())) if u.numel() else 0.0
    length = u.shape[-1]
    chunk = max(1, min(_MAX_CHUNK, length, int(_LOG_RANGE / steepest) if steepest > 0 else length))
    h = _Recurrence.apply(dA, dBu, chunk)

    y = (h * _per_channel(C.float(), u.shape[1])).sum(2)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h[..., -1]) if return_last_state else y
