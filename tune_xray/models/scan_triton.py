"""The selective scan as two Triton kernels, forward and backward: `model.scan_backend: triton`, and `auto`'s choice
on CUDA where mamba-ssm is not installed (Triton ships with torch's CUDA wheels; nothing to compile by hand).

One program per (batch, block of channels) walks L in tiles of BLOCK_L steps. In a tile the recurrence is a
`tl.associative_scan` of (decay, input) pairs under (a₁, b₁)∘(a₂, b₂) = (a₁a₂, a₂b₁ + b₂), the combine of
first-order linear recurrences (Blelloch 1990). Only decays e^{ΔA} ≤ 1 are multiplied: no decay is too steep.
The state entering each tile is stored, as in the torch backend; backward walks the tiles in reverse, recomputes
each tile's states from it, and scans the adjoint λ_t = ∂L/∂h_t + e^{Δ_{t+1}A} λ_{t+1} the same way with
`reverse=True`. Gradients summed over channels (B, C) or over batch and time (A, D, Δ bias) are written per
program and summed by torch afterwards: no atomics, so a run repeats bit for bit.

Parity with the step-by-step definition is tested on CPU under TRITON_INTERPRET=1 (tests/models/test_scan.py);
speed is measured by scripts/bench_train.py and scripts/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    """(a₁, b₁) then (a₂, b₂): h ↦ a₂(a₁h + b₁) + b₂."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """log(1 + eˣ), with log1p by Goldberg's correction (in fp32 log(1 + y) loses a small y to rounding)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    return tl.where(x > 20.0, x, tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _projection(P, pid_b, group, offs_n, offs_l, mask3, s_b, s_g, s_n, s_l):
    """B or C at a tile for each channel of the block: (BLOCK_D, BLOCK_N, BLOCK_L)."""
    at = pid_b * s_b + group[:, None, None] * s_g + offs_n[None, :, None] * s_n + offs_l[None, None, :] * s_l
    return tl.load(P + at, mask=mask3, other=0.0).to(tl.float32)


@triton.jit
def _step(DELTA, at, mask, bias, SOFTPLUS: tl.constexpr):
    """(Δ before softplus, Δ) at a tile; Δ = 0 where masked (a step past L passes the state through)."""
    raw = tl.load(DELTA + at, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    if SOFTPLUS:
        step = _softplus(raw)
    else:
        step = raw
    return raw, tl.where(mask, step, 0.0)


@triton.jit
def _program(A, BIAS, D, dim, n_state, n_tiles, channels_per_group, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """What a program (batch pid_b, channel block pid_d) holds throughout: its offsets and masks, each channel's
    group, A, Δ bias and D (zeros for an absent one), and where its chunk states live."""
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < n_state)[None, :]
    a = tl.load(A + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0)
    else:
        bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        skip = tl.load(D + offs_d, mask=mask_d, other=0.0)
    else:
        skip = tl.zeros([BLOCK_D], tl.float32)
    states_at = ((pid_b * dim + offs_d[:, None]) * n_state + offs_n[None, :]) * n_tiles
    return pid_b, pid_d, offs_d, offs_n, cols, mask_d, mask_dn, offs_d // channels_per_group, a, bias, skip, states_at


@triton.jit
def _tile(k, U, DELTA, B, pid_b, offs_d, offs_n, cols, mask_d, mask_dn, group, a, bias, length, s_b, s_d,
          sb_b, sb_g, sb_n, sb_l, SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tile k's steps: offsets and masks, u, Δ before softplus, Δ, the decay e^{ΔA} and the input Δ·u·B."""
    offs_l = k * BLOCK_L + cols
    mask_l = offs_l < length
    mask = mask_d[:, None] & mask_l[None, :]
    mask3 = mask_dn[:, :, None] & mask_l[None, None, :]
    at = pid_b * s_b + offs_d[:, None] * s_d + offs_l[None, :]
    u = tl.load(U + at, mask=mask, other=0.0).to(tl.float32)
    raw, step = _step(DELTA, at, mask, bias, SOFTPLUS)
    decay = tl.exp(step[:, None, :] * a[:, :, None])
    x = (step * u)[:, None, :] * _projection(B, pid_b, group, offs_n, offs_l, mask3, sb_b, sb_g, sb_n, sb_l)
    return offs_l, mask_l, mask, mask3, at, u, raw, step, decay, x


@triton.jit
def _scan_forward(U, DELTA, BIAS, A, B, C, D, Z, Y, STATES, LAST,
                  dim, length, n_state, n_tiles, channels_per_group, s_b, s_d,
                  sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
                  HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, _, offs_d, offs_n, cols, mask_d, mask_dn, group, a, bias, skip, states_at = _program(
        A, BIAS, D, dim, n_state, n_tiles, channels_per_group, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N, BLOCK_L)
    state = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for k in range(0, n_tiles):
        offs_l, _, mask, mask3, at, u, _, _, decay, x = _tile(
            k, U, DELTA, B, pid_b, offs_d, offs_n, cols, mask_d, mask_dn, group, a, bias, length, s_b, s_d,
            sb_b, sb_g, sb_n, sb_l, SOFTPLUS, BLOCK_L)
        tl.store(STATES + states_at + k, state, mask=mask_dn)
        carried, h = tl.associative_scan((decay, x), 2, _linear_combine)
        h += carried * state[:, :, None]
        state = tl.sum(tl.where(cols[None, None, :] == BLOCK_L - 1, h, 0.0), axis=2)
        y = tl.sum(_projection(C, pid_b, group, offs_n, offs_l, mask3, sc_b, sc_g, sc_n, sc_l) * h, axis=1)
        if HAS_D:
            y += skip[:, None] * u
        if HAS_Z:
            z = tl.load(Z + at, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + at, y, mask=mask)
    tl.store(LAST + (pid_b * dim + offs_d[:, None]) * n_state + offs_n[None, :], state, mask=mask_dn)


@triton.jit
def _scan_backward(U, DELTA, BIAS, A, B, C, D, Z, GRAD_Y, STATES,
                   GRAD_U, GRAD_DELTA, GRAD_Z, GRAD_B, GRAD_C, GRAD_A, GRAD_D, GRAD_BIAS,
                   dim, length, n_state, n_tiles, channels_per_group, s_b, s_d,
                   sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
                   HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, pid_d, offs_d, offs_n, cols, mask_d, mask_dn, group, a, bias, skip, states_at = _program(
        A, BIAS, D, dim, n_state, n_tiles, channels_per_group, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N, BLOCK_L)
    # per-program partial sums: B and C over the block's channels, A, D and the Δ bias over batch and time
    partial_bc = ((pid_b * tl.num_programs(1) + pid_d) * n_state + offs_n[:, None]) * length
    mask_n = offs_n < n_state
    lam_next = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # λ at the first step of the tile after (0 past L)
    grad_a = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    grad_skip = tl.zeros([BLOCK_D], tl.float32)
    grad_bias = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, n_tiles):
        k = n_tiles - 1 - i
        offs_l, mask_l, mask, mask3, at, u, raw, step, decay, x = _tile(
            k, U, DELTA, B, pid_b, offs_d, offs_n, cols, mask_d, mask_dn, group, a, bias, length, s_b, s_d,
            sb_b, sb_g, sb_n, sb_l, SOFTPLUS, BLOCK_L)
        cp = _projection(C, pid_b, group, offs_n, offs_l, mask3, sc_b, sc_g, sc_n, sc_l)
        entering = tl.load(STATES + states_at + k, mask=mask_dn, other=0.0)
        carried, h = tl.associative_scan((decay, x), 2, _linear_combine)
        h += carried * entering[:, :, None]
        # e^{Δ_{t+1} A}: the next step's decay (1 past L, where λ is 0)
        mask_next = mask_d[:, None] & (offs_l + 1 < length)[None, :]
        _, step_next = _step(DELTA, at + 1, mask_next, bias, SOFTPLUS)
        decay_next = tl.exp(step_next[:, None, :] * a[:, :, None])
        dy = tl.load(GRAD_Y + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:  # y = y₀·silu(z): ∂/∂z = y₀ σ(z)(1 + z(1 − σ(z)))
            z = tl.load(Z + at, mask=mask, other=0.0).to(tl.float32)
            gate = tl.sigmoid(z)
            y0 = tl.sum(cp * h, axis=1)
            if HAS_D:
                y0 += skip[:, None] * u
            tl.store(GRAD_Z + at, dy * y0 * gate * (1.0 + z * (1.0 - gate)), mask=mask)
            dy = dy * z * gate
        onward, lam = tl.associative_scan((decay_next, dy[:, None, :] * cp), 2, _linear_combine, reverse=True)
        lam += onward * lam_next[:, :, None]
        lam_next = tl.sum(tl.where(cols[None, None, :] == 0, lam, 0.0), axis=2)
        mask_nl = mask_n[:, None] & mask_l[None, :]
        tl.store(GRAD_C + partial_bc + offs_l[None, :], tl.sum(dy[:, None, :] * h, axis=0), mask=mask_nl)
        tl.store(GRAD_B + partial_bc + offs_l[None, :], tl.sum(lam * (step * u)[:, None, :], axis=0), mask=mask_nl)
        grad_dA = lam * (h - x)  # ∂L/∂(Δ_t A): e^{Δ_t A} h_{t-1} = h_t − x_t
        lam_b = tl.sum(lam * _projection(B, pid_b, group, offs_n, offs_l, mask3, sb_b, sb_g, sb_n, sb_l), axis=1)
        grad_step = tl.sum(grad_dA * a[:, :, None], axis=1) + lam_b * u
        grad_u = lam_b * step
        if HAS_D:
            grad_u += dy * skip[:, None]
            grad_skip += tl.sum(dy * u, axis=1)
        grad_a += tl.sum(grad_dA * step[:, None, :], axis=2)
        if SOFTPLUS:
            grad_step = grad_step * tl.sigmoid(raw)
        grad_raw = tl.where(mask, grad_step, 0.0)
        grad_bias += tl.sum(grad_raw, axis=1)
        tl.store(GRAD_U + at, grad_u, mask=mask)
        tl.store(GRAD_DELTA + at, grad_raw, mask=mask)
    per_channel = pid_b * dim + offs_d
    tl.store(GRAD_A + per_channel[:, None] * n_state + offs_n[None, :], grad_a, mask=mask_dn)
    tl.store(GRAD_D + per_channel, grad_skip, mask=mask_d)
    tl.store(GRAD_BIAS + per_channel, grad_bias, mask=mask_d)


def _as_groups(p: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) → (batch, 1, N, L); (batch, groups, N, L) as it is."""
    return p[:, None] if p.dim() == 3 else p


def _plan(dim: int, n_state: int, groups: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_L, channels per group): a tile of ≈4096 elements; with several groups (VMamba's
    directions) a channel block lies inside one group, so the block's B/C gradient belongs to that group."""
    block_n = triton.next_power_of_2(n_state)
    block_l = 128 if block_n < 4 else 64
    block_d = min(max(1, 4096 // (block_n * block_l)), triton.next_power_of_2(dim))
    per_group = dim // groups
    if groups > 1:
        while per_group % block_d:
            block_d //= 2
    return block_d, block_n, block_l, per_group


class Core:
    """The Triton backend as `scan._SelectiveScan` calls it (the torch backend's interface)."""

    @staticmethod
    def _setup(u, delta, A, B, C, D, z, delta_bias):
        batch, dim, length = u.shape
        B4, C4 = _as_groups(B), _as_groups(C)
        groups = max(B4.shape[1], C4.shape[1])
        block_d, block_n, block_l, per_group = _plan(dim, A.shape[1], groups)
        f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
        args = dict(U=u.contiguous(), DELTA=delta.contiguous(), BIAS=f32(delta_bias), A=f32(A), B=B4, C=C4,
                    D=f32(D), Z=None if z is None else z.contiguous())
        sizes = dict(dim=dim, length=length, n_state=A.shape[1], n_tiles=triton.cdiv(length, block_l),
                     channels_per_group=per_group, s_b=dim * length, s_d=length,
                     **{f"sb_{k}": (B4.stride(i) if B4.shape[i] > 1 or k == "l" else 0) for i, k in enumerate("bgnl")},
                     **{f"sc_{k}": (C4.stride(i) if C4.shape[i] > 1 or k == "l" else 0) for i, k in enumerate("bgnl")})
        flags = dict(HAS_BIAS=delta_bias is not None, HAS_D=D is not None, HAS_Z=z is not None,
                     BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l)
        grid = (batch, triton.cdiv(dim, block_d))
        placeholder = args["U"]  # an absent input's pointer, never read (its HAS_ flag is off)
        return {k: placeholder if v is None else v for k, v in args.items()}, sizes, flags, grid

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, softplus):
        args, sizes, flags, grid = Core._setup(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        y = torch.empty(batch, dim, length, device=u.device, dtype=torch.float32)
        states = torch.empty(batch, dim, A.shape[1], sizes["n_tiles"], device=u.device, dtype=torch.float32)
        last = torch.empty(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
        _scan_forward[grid](**args, Y=y, STATES=states, LAST=last, **sizes, SOFTPLUS=softplus, **flags)
        return y, last, states

    @staticmethod
    def backward(grad_y, u, delta, A, B, C, D, z, delta_bias, softplus, states):
        args, sizes, flags, grid = Core._setup(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        n, blocks = A.shape[1], grid[1]
        empty = lambda *shape: torch.empty(*shape, device=u.device, dtype=torch.float32)  # noqa: E731
        grads = dict(GRAD_U=empty(batch, dim, length), GRAD_DELTA=empty(batch, dim, length),
                     GRAD_Z=empty(batch, dim, length) if z is not None else args["U"],
                     GRAD_B=empty(batch, blocks, n, length), GRAD_C=empty(batch, blocks, n, length),
                     GRAD_A=empty(batch, dim, n), GRAD_D=empty(batch, dim), GRAD_BIAS=empty(batch, dim))
        _scan_backward[grid](**args, GRAD_Y=grad_y.contiguous(), STATES=states, **grads, **sizes, SOFTPLUS=softplus,
                             **flags)

        def per_group(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            groups = _as_groups(like).shape[1]
            return partial.view(batch, groups, blocks // groups, n, length).sum(2).reshape(like.shape)

        return (grads["GRAD_U"], grads["GRAD_DELTA"], grads["GRAD_A"].sum(0), per_group(grads["GRAD_B"], B),
                per_group(grads["GRAD_C"], C), grads["GRAD_D"].sum(0) if D is not None else None,
                grads["GRAD_Z"] if z is not None else None,
                grads["GRAD_BIAS"].sum(0) if delta_bias is not None else None)

