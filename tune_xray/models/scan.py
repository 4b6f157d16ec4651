"""Mamba's selective scan (Gu & Dao 2023, Alg. 2) with mamba-ssm's signature, on one of three backends:
mamba-ssm's fused CUDA kernel (`kernel`), our Triton kernel (`triton`, scan_triton.py: Triton ships with torch's
CUDA wheels) or a pure-PyTorch chunked scan (`torch`, any device). `auto` takes the first of them that can run.

The recurrence, per channel d and state n:  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,   y_t = C_t·h_t + D u_t.

The torch backend is one autograd Function for the whole scan (Δ bias and softplus, Δ·u·B, the recurrence, the
C contraction, D and the z gate). Like mamba-ssm's kernel it saves only its inputs, in their own dtype, and the
state entering each chunk; backward recomputes the rest. A saved-tensor budget of two inputs' size, where keeping
every intermediate cost eight fp32 tensors of (batch, dim, L) per call (VMamba-S ran out of memory at batch 128).

Time is cut into chunks of a fixed length T ≤ 8 (from L alone: no host sync, no data-dependent plan). Inside a
chunk the recurrence runs step by step, vectorised over all chunks at once, multiplying decays e^{Δ_t A} ≤ 1 as
the definition does; the states carried from chunk to chunk are a log-step scan over the chunk ends (Hillis &
Steele 1986), which also only multiplies decays. No exponent is ever positive, so no decay is too steep (the
earlier e^{-cumsum} form needed data-dependent chunks and a host read per layer to stay finite). Exact: it
matches the step-by-step loop to fp32 rounding. Backward runs the adjoint λ_t = ∂L/∂h_t + e^{Δ_{t+1}A} λ_{t+1}
the same way in reverse; ∂L/∂(Δ_t A) = λ_t (h_t − Δ_t B_t u_t).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def _kernel():
    """mamba-ssm's fused selective scan, or None when it is not installed (the CPU/CI case: silent)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a build without its CUDA extension
        return None
    return selective_scan_fn


@functools.cache
def _triton():
    """Our Triton scan (scan_triton.Core), or None where Triton does not import."""
    try:
        from . import scan_triton
    except Exception:  # ImportError: no triton (CPU-only torch wheels, macOS)
        return None
    return scan_triton.Core


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (numpy), how the kernel is tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on `device`, in `auto`'s order of preference (on CPU the interpreted Triton
    kernel comes last: it is for testing, thousands of times slower)."""
    cuda = torch.device(device).type == "cuda"
    triton = ["triton"] if (cuda or triton_interpreted()) and _triton() is not None else []
    if not cuda:
        return ["torch", *triton]
    return (["kernel"] if _kernel() is not None else []) + triton + ["torch"]


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The backend `requested` (model.scan_backend) names on `device`: `auto` is the first available; a named one
    that cannot run there is a ValueError saying why. An `auto` CUDA model that lands on `torch` is warned about:
    it trains, at a fraction of a kernel's speed."""
    available = available_backends(device)
    if requested == "auto":
        chosen = available[0]
        if chosen == "torch" and torch.device(device).type == "cuda":
            warnings.warn("model.scan_backend=auto on CUDA: neither mamba-ssm nor Triton is importable; the "
                          "selective scan falls back to pure PyTorch (correct, several times slower)", RuntimeWarning,
                          stacklevel=2)
        return chosen
    if requested not in available:
        why = {"kernel": "mamba-ssm is not installed (pip install tune_xray[mamba]) or the device is not CUDA",
               "triton": "Triton kernels run on CUDA (or on CPU with TRITON_INTERPRET=1)"}.get(requested, "")
        raise ValueError(f"model.scan_backend={requested} cannot run on {device}: {why}; available: {available}")
    return requested


def scan_backend() -> str:
    """Which paths this installation offers (said once in the log when an SSM backbone is built)."""
    return ", ".join(available_backends("cuda")) + " on CUDA; " + ", ".join(available_backends("cpu")) + " on CPU"


def build_ssm_model(model_cls, variant: str, pretrained: bool, **kwargs):
    """A timm entry point's body for our SSM backbones; the log says which scan paths there are. Their released
    files are trainer checkpoints (a pickled configuration beside the weights, an EMA copy) that timm's loader does
    not read: `tune_xray.models.create_backbone(name, pretrained=True)` (model.pretrained) loads them."""
    from timm.models import build_model_with_cfg

    if pretrained:
        raise ValueError(f"{variant}: its release files are trainer checkpoints; load them with "
                         "tune_xray.models.create_backbone(name, pretrained=True) (a study's model.pretrained)")
    log.info("%s: selective scan backends: %s", variant, scan_backend())
    return build_model_with_cfg(model_cls, variant, False, feature_cfg=dict(flatten_sequential=True), **kwargs)


def set_scan_backend(model: torch.nn.Module, backend: str) -> None:
    """Every selective-scan layer of `model` (a module with a `scan_backend` attribute) uses `backend`."""
    for m in model.modules():
        if hasattr(m, "scan_backend"):
            m.scan_backend = backend


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto",
                   delta_proj_weight: Optional[torch.Tensor] = None):
    """y = selective_scan(u, Δ, A, B, C, D, z, Δ_bias, softplus) with mamba-ssm's shapes.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L), (batch, groups, N, L) with dim divisible
    by groups (VMamba's four scan directions), or (dim, N) for a time-invariant B/C; D, delta_bias: (dim,).
    With `delta_proj_weight` (dim, R) or (groups, dim/groups, R), `delta` is the low-rank input of Δ = W·delta,
    (batch, R, L) or (batch, groups, R, L), as in mamba-ssm's `mamba_inner_fn`: Δ is recomputed in backward, not
    kept. Returns y (batch, dim, L) in u's dtype, and the last state (batch, dim, N) if `return_last_state`.
    """
    check_groups(u, B, C)
    if backend == "auto":
        backend = available_backends(u.device)[0]
    if backend == "kernel":
        if delta_proj_weight is not None:
            delta = full_delta(delta, delta_proj_weight).to(u.dtype)
        return _kernel()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    core = _triton() if backend == "triton" and B.dim() > 2 and C.dim() > 2 else TorchCore  # fixed B/C: torch
    y, last = _SelectiveScan.apply(core, u, delta, delta_proj_weight, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


def check_groups(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    """Time-varying B and C serve the same groups of channels (mamba-ssm's rule), and the groups split dim evenly:
    a ValueError naming the shapes otherwise (the Triton kernel would read B or C past its end)."""
    groups = {_groups(x) for x in (B, C) if x.dim() > 2}
    if len(groups) > 1:
        raise ValueError(f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} have different group counts; "
                         "time-varying B and C must serve the same groups of channels")
    if groups and u.shape[1] % (g := groups.pop()):
        raise ValueError(f"selective_scan: {g} groups of B/C do not split dim {u.shape[1]} of u {tuple(u.shape)} "
                         "evenly")


def full_delta(delta: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Δ before its bias, (batch, dim, L): `delta` itself, or W·delta for a low-rank `delta` (fp32)."""
    if weight is None:
        return delta
    if weight.dim() == 2:  # (dim, R) · (batch, R, L)
        return torch.matmul(weight.float(), delta.float())
    return torch.matmul(weight.float(), delta.float()).flatten(1, 2)  # (G, dim/G, R) · (batch, G, R, L)


def _low_rank_grads(grad: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
    """∂L/∂delta and ∂L/∂W of Δ = W·delta from ∂L/∂Δ (batch, dim, L)."""
    if weight.dim() == 3:
        grad = grad.view(grad.shape[0], weight.shape[0], weight.shape[1], -1)
    w, low = weight.float(), delta.float()
    grad_delta = torch.matmul(w.transpose(-1, -2), grad)
    grad_weight = torch.matmul(grad, low.transpose(-1, -2)).sum(0)
    return grad_delta.to(delta.dtype), grad_weight.to(weight.dtype)


class _SelectiveScan(torch.autograd.Function):
    """The whole selective scan as one node of the graph, on a backend's `core` (TorchCore, or scan_triton.Core):
    `core.forward` returns (y, last state, states entering each chunk); only the inputs, in their own dtype, and
    those states are saved; `core.backward` recomputes the rest. Computes in fp32 whatever autocast says."""

    @staticmethod
    def forward(ctx, core, u, delta, weight, A, B, C, D, z, delta_bias, softplus):
        with torch.autocast(u.device.type, enabled=False):
            y, last, states = core.forward(u, full_delta(delta, weight), A, B, C, D, z, delta_bias, softplus)
        ctx.core, ctx.softplus = core, softplus
        ctx.save_for_backward(u, delta, weight, A, B, C, D, z, delta_bias, states)
        ctx.mark_non_differentiable(last)
        return y.to(u.dtype), last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_last):
        u, delta, weight, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):
            grads = ctx.core.backward(grad_y, u, full_delta(delta, weight), A, B, C, D, z, delta_bias, ctx.softplus,
                                      states)
            grad_u, grad_delta, *rest = grads
            grad_weight = None
            if weight is not None:
                grad_delta, grad_weight = _low_rank_grads(grad_delta, delta, weight)
        return (None, grad_u.to(u.dtype), grad_delta.to(delta.dtype), grad_weight,
                *[g if g is None else g.to(x.dtype) for g, x in zip(rest, (A, B, C, D, z, delta_bias))], None)


def chunk_length(length: int) -> int:
    """T: 8, else 7 or 6 where that divides L with no padding (MambaVision's 14² = 196 and 7² = 49 windows)."""
    return next((t for t in (8, 7, 6) if length % t == 0), 8)


def log_step_scan(decay: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = decay_t h_{t-1} + x_t along the last dim from h_0 = 0, in log2(L) steps (Hillis & Steele 1986):
    only products of decays ≤ 1, so no decay is too steep for it."""
    h, step = x.clone(), 1
    while step < x.shape[-1]:
        h[..., step:] += decay[..., step:] * h[..., :-step]  # the product is a new tensor: no aliasing
        if 2 * step < x.shape[-1]:
            decay = torch.cat([decay[..., :step], decay[..., step:] * decay[..., :-step]], -1)
        step *= 2
    return h


class _Discretized:
    """Δ, e^{ΔA} and Δ·u·B in fp32, chunk-major: time l = c·T + t at [t, …, c] of (T, batch, dim, N, chunks), so
    that each step inside the chunks is one contiguous slice (time-major, it would read every cache line of the
    tensor once per step). L is padded to whole chunks; a padded step has Δ = 0: decay 1, no input, the state
    passes through unchanged. Built in forward and again in backward."""

    def __init__(self, u, delta, A, B, C, delta_bias, softplus: bool):
        self.batch, self.dim, self.length = u.shape
        self.chunk = chunk_length(self.length)
        self.pad = -self.length % self.chunk
        self.raw = self.chunk_major(delta.float())
        if delta_bias is not None:
            self.raw = self.raw + delta_bias.float()[:, None]
        self.step = F.softplus(self.raw) if softplus else self.raw  # Δ, (T, batch, dim, chunks)
        self.u = self.chunk_major(u.float())
        self.A = A.float()
        self.B, self.C = self.projection(B), self.projection(C)

    def chunk_major(self, t: torch.Tensor) -> torch.Tensor:
        """(…, L) → (T, …, chunks), contiguous, zero-padded."""
        t = F.pad(t, (0, self.pad)) if self.pad else t
        return t.unflatten(-1, (-1, self.chunk)).movedim(-1, 0).contiguous()

    def time_major(self, t: torch.Tensor) -> torch.Tensor:
        """(T, …, chunks) → (…, L): the inverse, unpadded."""
        return t.movedim(0, -1).flatten(-2)[..., :self.length]

    def projection(self, x: torch.Tensor) -> torch.Tensor:
        """B or C broadcastable to (T, batch, groups, dim/groups, N, chunks): channels g·dim/groups … read group
        g (VMamba's four scan directions); one group when B/C is shared by every channel or fixed (dim, N)."""
        if x.dim() == 2:
            return x.float().view(1, 1, 1, self.dim, -1, 1)
        x = self.chunk_major(x.float() if x.dim() == 4 else x.float()[:, None])  # (T, batch, groups, N, chunks)
        return x.unsqueeze(3)

    def grouped(self, t: torch.Tensor, groups: int) -> torch.Tensor:
        """(T, batch, dim, N or 1, chunks) → (T, batch, groups, dim/groups, N or 1, chunks), a view."""
        return t.view(*t.shape[:2], groups, self.dim // groups, *t.shape[3:])

    def decay(self) -> torch.Tensor:
        return torch.mul(self.step[:, :, :, None], self.A[:, :, None]).exp_()

    def inputs(self) -> torch.Tensor:
        """x = Δ·u·B, (T, batch, dim, N, chunks)."""
        du = self.grouped((self.step * self.u)[:, :, :, None], self.B.shape[2])
        return (du * self.B).view(*du.shape[:2], self.dim, -1, du.shape[-1])

    def contract(self, h: torch.Tensor, BC: torch.Tensor) -> torch.Tensor:
        """Σ_n h_n·(B or C)_n: (T, batch, dim, N, chunks) → (T, batch, dim, chunks) (for N = 1 the product: a sum
        over one element would copy)."""
        product = self.grouped(h, BC.shape[2]).mul(BC)
        return (product.sum(4) if h.shape[3] > 1 else product).view(*h.shape[:3], -1)

    def per_group(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """∂L/∂B or ∂L/∂C from the per-channel product `t` (T, batch, dim, N, chunks): summed over each group's
        channels, in `like`'s shape (over batch and time too for a time-invariant B/C; padded steps hold 0)."""
        if like.dim() == 2:  # (dim, N)
            return t.sum((0, 1, 4))
        t = self.grouped(t, _groups(like)).sum(3)
        return self.time_major(t).reshape(like.shape)

    def output(self, h: torch.Tensor, D) -> torch.Tensor:
        """y before the gate: C·h + D u, fp32, chunk-major."""
        y = self.contract(h, self.C)
        return y + D.float()[:, None] * self.u if D is not None else y


def _groups(x: torch.Tensor) -> int:
    return x.shape[1] if x.dim() == 4 else 1


def _states_entering_chunks(decay: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The state entering each chunk, (…, chunks), from chunk-major decay and x: each chunk's end state from zero
    and its total decay, step by step inside the chunks (all at once), then carried across chunk ends by the
    log-step scan."""
    end, total = x[0].clone(), decay[0].clone()
    for t in range(1, x.shape[0]):
        end = torch.addcmul(x[t], decay[t], end)
        total.mul_(decay[t])
    entering = torch.zeros_like(end)
    if end.shape[-1] > 1:
        entering[..., 1:] = log_step_scan(total[..., :-1], end[..., :-1])
    return entering


def _scan_in_place(decay: torch.Tensor, x: torch.Tensor, entering: torch.Tensor) -> torch.Tensor:
    """Chunk-major x becomes h: h_t = decay_t h_{t-1} + x_t from the state entering each chunk."""
    x[0].addcmul_(decay[0], entering)
    for t in range(1, x.shape[0]):
        x[t].addcmul_(decay[t], x[t - 1])
    return x


def _adjoint_in_place(decay: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Chunk-major g = ∂L/∂h becomes λ: λ_t = g_t + decay_{t+1} λ_{t+1}, λ after the end = 0 — the scan run
    backwards: each chunk's λ at its start from zero, the adjoint flowing into each chunk's end across chunks
    (m_{k-1} = total_k m_k + decay_{k,0} λ_{k,0}, a log-step scan on reversed chunks), then step by step."""
    steps = g.shape[0]
    start, total = g[-1].clone(), decay[0].clone()
    for t in range(steps - 2, -1, -1):
        start = torch.addcmul(g[t], decay[t + 1], start)
        total.mul_(decay[t + 1])
    flowing = torch.zeros_like(start)
    if start.shape[-1] > 1:
        later = lambda t: t[..., 1:].flip(-1)  # noqa: E731  (chunks 1 … last, last first)
        flowing[..., :-1] = log_step_scan(later(total), later(decay[0] * start)).flip(-1)
    g[-1] += flowing
    for t in range(steps - 2, -1, -1):
        g[t].addcmul_(decay[t + 1], g[t + 1])
    return g


class TorchCore:
    """The scan in PyTorch ops on any device: chunks of T steps, step by step inside, log-step across."""

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, softplus):
        """(y fp32, the last state (batch, dim, N), the states entering each chunk (batch, dim, N, chunks))."""
        disc = _Discretized(u, delta, A, B, C, delta_bias, softplus)
        decay, x = disc.decay(), disc.inputs()
        entering = _states_entering_chunks(decay, x)
        h = _scan_in_place(decay, x, entering)
        del decay
        y = disc.output(h, D)
        if z is not None:
            y = y * F.silu(disc.chunk_major(z.float()))
        end = disc.length - 1
        # the last state as its own tensor: a view would keep all of h alive for as long as the caller keeps it
        return disc.time_major(y), h[end % disc.chunk, ..., end // disc.chunk].clone(), entering

    @staticmethod
    def backward(grad_y, u, delta, A, B, C, D, z, delta_bias, softplus, entering):
        """∂L/∂(u, delta, A, B, C, D, z, delta_bias), fp32 (None for an absent input)."""
        disc = _Discretized(u, delta, A, B, C, delta_bias, softplus)
        decay, x = disc.decay(), disc.inputs()
        h = _scan_in_place(decay, x.clone(), entering)
        grad_y, grad_z = disc.chunk_major(grad_y.float()), None
        if z is not None:  # y = y₀·silu(z): ∂/∂z = y₀ σ(z)(1 + z(1 − σ(z)))
            zf = disc.chunk_major(z.float())
            gate = torch.sigmoid(zf)
            grad_z = disc.time_major(grad_y * disc.output(h, D) * gate * (1 + zf * (1 - gate)))
            grad_y = grad_y * zf * gate
        grad_C = disc.per_group(grad_y[:, :, :, None] * h, C)
        grad_D = (grad_y * disc.u).sum((0, 1, 3)) if D is not None else None
        h.sub_(x)  # h_t − x_t = decay_t h_{t−1}
        groups = disc.C.shape[2]  # x's storage takes ∂L/∂h = grad_y·C, then λ
        torch.mul(disc.grouped(grad_y[:, :, :, None], groups), disc.C, out=disc.grouped(x, groups))
        lam = _adjoint_in_place(decay, x)  # λ = ∂L/∂x, x = Δ·u·B
        del decay
        grad_dA = h.mul_(lam)  # ∂L/∂(Δ_t A)
        lam_b = disc.contract(lam, disc.B)  # Σ_n λ_n B_n
        grad_u = lam_b * disc.step
        if D is not None:
            grad_u.addcmul_(grad_y, D.float()[:, None])
        grad_B = disc.per_group(lam.mul_((disc.step * disc.u)[:, :, :, None]), B)
        grad_step = lam_b.mul_(disc.u)
        if A.shape[1] == 1:
            grad_A = (grad_dA[:, :, :, 0] * disc.step).sum((0, 1, 3))[:, None]
            grad_step.addcmul_(grad_dA[:, :, :, 0], disc.A)
        else:
            grad_A = (grad_dA * disc.step[:, :, :, None]).sum((0, 1, 4))
            grad_step += (grad_dA * disc.A[:, :, None]).sum(3)
        grad_raw = grad_step * torch.sigmoid(disc.raw) if softplus else grad_step
        grad_bias = grad_raw.sum((0, 1, 3)) if delta_bias is not None else None
        return (disc.time_major(grad_u), disc.time_major(grad_raw), grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias)
