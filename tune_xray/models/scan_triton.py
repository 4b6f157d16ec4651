"""The selective scan as two Triton kernels, forward and backward: `model.scan_backend: triton`, and `auto`'s choice
on CUDA where mamba-ssm is not installed (Triton ships with torch's CUDA wheels; nothing to compile by hand).

One program per (batch, block of channels inside one group of B/C) walks L in tiles of BLOCK_L steps. In a tile the
recurrence is a `tl.associative_scan` of (decay, input) pairs under (a₁, b₁)∘(a₂, b₂) = (a₁a₂, a₂b₁ + b₂), the
combine of first-order linear recurrences (Blelloch 1990). Only decays e^{ΔA} ≤ 1 are multiplied: no decay is too
steep. The state entering each tile is stored, as in the torch backend; backward walks the tiles in reverse,
recomputes each tile's states from it, and scans the adjoint λ_t = ∂L/∂h_t + e^{Δ_{t+1}A} λ_{t+1} the same way with
`reverse=True`. Gradients summed over channels (B, C) or over batch and time (A, D, Δ bias) are written per program
and summed by torch afterwards: no atomics, so a run repeats bit for bit.

A program's block lies inside one group, so it reads one (N, BLOCK_L) tile of B and of C and broadcasts it over its
channels. The block is at least N channels wide, so the per-block B/C gradients together are no larger than u
(`plan`). Tile sizes and warps per N are the ones whose compiled kernels keep every value in registers:
scripts/scan_kernels.py compiles every variant the models launch for sm_80 and sm_90 with Triton's own compiler (no
GPU needed) and prints registers, spills and shared memory; tests/models/test_scan_compile.py fails on a compile
error or a spill. Parity with the step-by-step definition is tested on CPU under TRITON_INTERPRET=1
(tests/models/test_scan.py) and on a GPU by scripts/gpu_check.sh.

What backward keeps: the inputs and one fp32 state per tile, (batch, dim, N, L / BLOCK_L): 1/32 of u's elements at
N 1, 1/2 at N 8, 4× at N 16 (its tiles are 4 steps long).
"""

from __future__ import annotations

from typing import NamedTuple

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
def _projection(P, offs_n, offs_l, mask_nl, s_n, s_l):
    """B or C of the program's batch and group at a tile: (BLOCK_N, BLOCK_L), shared by the block's channels."""
    return tl.load(P + offs_n[:, None] * s_n + offs_l[None, :] * s_l, mask=mask_nl, other=0.0).to(tl.float32)


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
def _program(A, BIAS, D, n_state, per_group, blocks_per_group, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """What a program (batch pid_b, channel block pid_d) holds throughout: its group, its channels (`offs_d`, from
    the batch's first) and masks, A, Δ bias and D (zeros for an absent one). Per-batch offsets are 64-bit scalars
    added to the base pointers; offsets inside one batch's (dim, L) stay 32-bit."""
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    group = pid_d // blocks_per_group
    in_group = (pid_d % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_d = group * per_group + in_group
    offs_n, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
    mask_d, mask_n = in_group < per_group, offs_n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    a = tl.load(A + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0)
    else:
        bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        skip = tl.load(D + offs_d, mask=mask_d, other=0.0)
    else:
        skip = tl.zeros([BLOCK_D], tl.float32)
    return pid_b, pid_d, group, offs_d, offs_n, cols, mask_d, mask_n, mask_dn, a, bias, skip


@triton.jit
def _tile(k, U, DELTA, B, offs_d, offs_n, cols, mask_d, mask_n, a, bias, length, sb_n, sb_l,
          SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tile k's steps (U, DELTA, B at the program's batch and group): offsets and masks, u, Δ before softplus, Δ,
    B, the decay e^{ΔA} and the input Δ·u·B."""
    offs_l = k * BLOCK_L + cols
    mask_l = offs_l < length
    mask = mask_d[:, None] & mask_l[None, :]
    mask_nl = mask_n[:, None] & mask_l[None, :]
    at = offs_d[:, None] * length + offs_l[None, :]
    u = tl.load(U + at, mask=mask, other=0.0).to(tl.float32)
    raw, step = _step(DELTA, at, mask, bias, SOFTPLUS)
    bp = _projection(B, offs_n, offs_l, mask_nl, sb_n, sb_l)
    decay = tl.exp(step[:, None, :] * a[:, :, None])
    x = (step * u)[:, None, :] * bp[None, :, :]
    return offs_l, mask_l, mask, mask_nl, at, u, raw, step, bp, decay, x


@triton.jit
def _scan_forward(U, DELTA, BIAS, A, B, C, D, Z, Y, STATES, LAST,
                  dim, n_state, per_group, blocks_per_group, length, n_tiles,
                  sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
                  HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, pid_d, group, offs_d, offs_n, cols, mask_d, mask_n, mask_dn, a, bias, skip = _program(
        A, BIAS, D, n_state, per_group, blocks_per_group, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N, BLOCK_L)
    row = pid_b * dim * length
    U, DELTA, Y = U + row, DELTA + row, Y + row
    if HAS_Z:
        Z += row
    B, C = B + pid_b * sb_b + group * sb_g, C + pid_b * sc_b + group * sc_g
    STATES += pid_b * dim * n_state * n_tiles
    states_at = (offs_d[:, None] * n_state + offs_n[None, :]) * n_tiles
    state = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for k in range(0, n_tiles):
        offs_l, mask_l, mask, mask_nl, at, u, raw, step, bp, decay, x = _tile(
            k, U, DELTA, B, offs_d, offs_n, cols, mask_d, mask_n, a, bias, length, sb_n, sb_l, SOFTPLUS, BLOCK_L)
        tl.store(STATES + states_at + k, state, mask=mask_dn)
        carried, h = tl.associative_scan((decay, x), 2, _linear_combine)
        h += carried * state[:, :, None]
        state = tl.sum(tl.where(cols[None, None, :] == BLOCK_L - 1, h, 0.0), axis=2)
        y = tl.sum(_projection(C, offs_n, offs_l, mask_nl, sc_n, sc_l)[None, :, :] * h, axis=1)
        if HAS_D:
            y += skip[:, None] * u
        if HAS_Z:
            z = tl.load(Z + at, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + at, y, mask=mask)
    tl.store(LAST + pid_b * dim * n_state + offs_d[:, None] * n_state + offs_n[None, :], state, mask=mask_dn)


@triton.jit
def _scan_backward(U, DELTA, BIAS, A, B, C, D, Z, GRAD_Y, STATES,
                   GRAD_U, GRAD_DELTA, GRAD_Z, GRAD_B, GRAD_C, GRAD_A, GRAD_D, GRAD_BIAS,
                   dim, n_state, per_group, blocks_per_group, length, n_tiles,
                   sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
                   HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, pid_d, group, offs_d, offs_n, cols, mask_d, mask_n, mask_dn, a, bias, skip = _program(
        A, BIAS, D, n_state, per_group, blocks_per_group, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N, BLOCK_L)
    row = pid_b * dim * length
    U, DELTA, GRAD_Y, GRAD_U, GRAD_DELTA = U + row, DELTA + row, GRAD_Y + row, GRAD_U + row, GRAD_DELTA + row
    if HAS_Z:
        Z, GRAD_Z = Z + row, GRAD_Z + row
    B, C = B + pid_b * sb_b + group * sb_g, C + pid_b * sc_b + group * sc_g
    # per-program partial sums: B and C over the block's channels, A, D and the Δ bias over time (and batch after)
    partial = (pid_b * tl.num_programs(1) + pid_d) * n_state * length
    GRAD_B, GRAD_C = GRAD_B + partial, GRAD_C + partial
    STATES += pid_b * dim * n_state * n_tiles
    states_at = (offs_d[:, None] * n_state + offs_n[None, :]) * n_tiles
    lam_next = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # λ at the first step of the tile after (0 past L)
    grad_a = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    grad_skip = tl.zeros([BLOCK_D], tl.float32)
    grad_bias = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, n_tiles):
        k = n_tiles - 1 - i
        offs_l, mask_l, mask, mask_nl, at, u, raw, step, bp, decay, x = _tile(
            k, U, DELTA, B, offs_d, offs_n, cols, mask_d, mask_n, a, bias, length, sb_n, sb_l, SOFTPLUS, BLOCK_L)
        entering = tl.load(STATES + states_at + k, mask=mask_dn, other=0.0)
        carried, h = tl.associative_scan((decay, x), 2, _linear_combine)
        h += carried * entering[:, :, None]
        cp = _projection(C, offs_n, offs_l, mask_nl, sc_n, sc_l)
        dy = tl.load(GRAD_Y + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:  # y = y₀·silu(z): ∂/∂z = y₀ σ(z)(1 + z(1 − σ(z)))
            z = tl.load(Z + at, mask=mask, other=0.0).to(tl.float32)
            gate = tl.sigmoid(z)
            y0 = tl.sum(cp[None, :, :] * h, axis=1)
            if HAS_D:
                y0 += skip[:, None] * u
            tl.store(GRAD_Z + at, dy * y0 * gate * (1.0 + z * (1.0 - gate)), mask=mask)
            dy = dy * z * gate
        at_nl = offs_n[:, None] * length + offs_l[None, :]
        tl.store(GRAD_C + at_nl, tl.sum(dy[:, None, :] * h, axis=0), mask=mask_nl)
        decayed = h - x  # e^{Δ_t A} h_{t-1} = h_t − x_t: all of h that backward still needs
        # e^{Δ_{t+1} A}: the next step's decay (1 past L, where λ is 0)
        mask_next = mask_d[:, None] & (offs_l + 1 < length)[None, :]
        raw_next, step_next = _step(DELTA, at + 1, mask_next, bias, SOFTPLUS)
        decay_next = tl.exp(step_next[:, None, :] * a[:, :, None])
        onward, lam = tl.associative_scan((decay_next, dy[:, None, :] * cp[None, :, :]), 2, _linear_combine,
                                          reverse=True)
        lam += onward * lam_next[:, :, None]
        lam_next = tl.sum(tl.where(cols[None, None, :] == 0, lam, 0.0), axis=2)
        tl.store(GRAD_B + at_nl, tl.sum(lam * (step * u)[:, None, :], axis=0), mask=mask_nl)
        grad_dA = lam * decayed  # ∂L/∂(Δ_t A)
        lam_b = tl.sum(lam * bp[None, :, :], axis=1)
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
    tl.store(GRAD_A + pid_b * dim * n_state + offs_d[:, None] * n_state + offs_n[None, :], grad_a, mask=mask_dn)
    tl.store(GRAD_D + pid_b * dim + offs_d, grad_skip, mask=mask_d)
    tl.store(GRAD_BIAS + pid_b * dim + offs_d, grad_bias, mask=mask_d)


class Plan(NamedTuple):
    """How one call is cut into programs: (batch, groups × blocks_per_group) programs of BLOCK_D channels × BLOCK_N
    states, walking L in n_tiles tiles of BLOCK_L steps, each run by num_warps warps."""
    block_d: int
    block_n: int
    block_l: int
    num_warps: int
    groups: int
    per_group: int
    blocks_per_group: int
    n_tiles: int


# BLOCK_N → (BLOCK_D, BLOCK_L, warps): per state size, the largest tile whose backward kernel, compiled for sm_80 and
# sm_90 with every variant, keeps all its values in at most 128 registers (two 8-warp programs fill an SM's 64K):
# no spills to local memory. BLOCK_D ≥ BLOCK_N, so the per-block B/C gradients are no larger than u. Chosen from
# `python scripts/scan_kernels.py --sweep`; tests/models/test_scan_compile.py holds every variant to it.
TILES = {1: (32, 32, 8), 2: (16, 32, 8), 4: (32, 16, 8), 8: (16, 16, 8), 16: (16, 4, 8)}


def groups_of(B: torch.Tensor) -> int:
    """How many groups of channels B (or C) serves: (batch, groups, N, L) → groups; (batch, N, L) → 1."""
    return B.shape[1] if B.dim() == 4 else 1


def plan(dim: int, n_state: int, groups: int, length: int) -> Plan:
    """The launch plan of a scan over (batch, dim, L) with N = n_state and B/C in `groups` groups."""
    block_n = triton.next_power_of_2(n_state)
    if block_n not in TILES:
        raise ValueError(f"selective scan: the Triton kernel takes d_state up to {max(TILES)}, got {n_state}; "
                         "use model.scan_backend=torch (or kernel, mamba-ssm)")
    block_d, block_l, num_warps = TILES[block_n]
    per_group = dim // groups
    block_d = min(block_d, max(triton.next_power_of_2(per_group), block_n))  # no lanes past a small group
    # the B/C partials hold N values per block: no more than the group's channels (a group narrower than N: one
    # block). Where a last partial block breaks that (40 channels in blocks of 16 at N 16), wider blocks of
    # proportionally fewer steps, the same tile.
    while triton.cdiv(per_group, block_d) * n_state > max(per_group, n_state):
        block_d, block_l = 2 * block_d, max(1, block_l // 2)
    return Plan(block_d, block_n, block_l, num_warps, groups, per_group, triton.cdiv(per_group, block_d),
                triton.cdiv(length, block_l))


class Launch(NamedTuple):
    """One kernel launch, as Core runs it and as the compile check (scripts/scan_kernels.py) compiles it for
    other targets: the kernel, its grid, its keyword arguments (constexprs included) and warps."""
    kernel: object
    grid: tuple
    args: dict
    num_warps: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, num_warps=self.num_warps)


def _common(u, delta, A, B, C, D, z, delta_bias, softplus) -> tuple[Plan, dict]:
    """The plan and the arguments both kernels take."""
    batch, dim, length = u.shape
    p = plan(dim, A.shape[1], groups_of(B), length)
    B4, C4 = (x if x.dim() == 4 else x[:, None] for x in (B, C))
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    args = dict(U=u.contiguous(), DELTA=delta.contiguous(), BIAS=f32(delta_bias), A=f32(A), B=B4, C=C4, D=f32(D),
                Z=None if z is None else z.contiguous())
    placeholder = args["U"]  # an absent input's pointer, never read (its HAS_ flag is off)
    args = {k: placeholder if v is None else v for k, v in args.items()}
    args.update(dim=dim, n_state=A.shape[1], per_group=p.per_group, blocks_per_group=p.blocks_per_group,
                length=length, n_tiles=p.n_tiles,
                **{f"sb_{k}": B4.stride(i) for i, k in enumerate("bgnl")},
                **{f"sc_{k}": C4.stride(i) for i, k in enumerate("bgnl")},
                HAS_BIAS=delta_bias is not None, HAS_D=D is not None, HAS_Z=z is not None, SOFTPLUS=softplus,
                BLOCK_D=p.block_d, BLOCK_N=p.block_n, BLOCK_L=p.block_l)
    return p, args


def forward_launch(u, delta, A, B, C, D, z, delta_bias, softplus) -> tuple[Launch, tuple]:
    """The forward launch and its outputs: y (fp32), the last state and the state entering each tile."""
    p, args = _common(u, delta, A, B, C, D, z, delta_bias, softplus)
    batch, dim, length = u.shape
    f32 = lambda *shape: torch.empty(*shape, device=u.device, dtype=torch.float32)  # noqa: E731
    outputs = f32(batch, dim, length), f32(batch, dim, A.shape[1]), f32(batch, dim, A.shape[1], p.n_tiles)
    args.update(Y=outputs[0], LAST=outputs[1], STATES=outputs[2])
    return Launch(_scan_forward, (batch, p.groups * p.blocks_per_group), args, p.num_warps), outputs


def backward_launch(grad_y, u, delta, A, B, C, D, z, delta_bias, softplus, states) -> tuple[Launch, dict]:
    """The backward launch and its fp32 outputs: per-element gradients, and per-program partial sums (B and C over
    each block's channels; A, D and the Δ bias per batch)."""
    p, args = _common(u, delta, A, B, C, D, z, delta_bias, softplus)
    batch, dim, length = u.shape
    n, programs = A.shape[1], p.groups * p.blocks_per_group
    f32 = lambda *shape: torch.empty(*shape, device=u.device, dtype=torch.float32)  # noqa: E731
    grads = dict(GRAD_U=f32(batch, dim, length), GRAD_DELTA=f32(batch, dim, length),
                 GRAD_Z=f32(batch, dim, length) if z is not None else args["U"],
                 GRAD_B=f32(batch, programs, n, length), GRAD_C=f32(batch, programs, n, length),
                 GRAD_A=f32(batch, dim, n), GRAD_D=f32(batch, dim), GRAD_BIAS=f32(batch, dim))
    args.update(GRAD_Y=grad_y.contiguous(), STATES=states, **grads)
    return Launch(_scan_backward, (batch, programs), args, p.num_warps), grads


class Core:
    """The Triton backend as `scan._SelectiveScan` calls it (the torch backend's interface)."""

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, softplus):
        launch, (y, last, states) = forward_launch(u, delta, A, B, C, D, z, delta_bias, softplus)
        launch()
        return y, last, states

    @staticmethod
    def backward(grad_y, u, delta, A, B, C, D, z, delta_bias, softplus, states):
        launch, grads = backward_launch(grad_y, u, delta, A, B, C, D, z, delta_bias, softplus, states)
        launch()
        batch, groups, n = u.shape[0], groups_of(B), A.shape[1]

        def per_group(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return partial.view(batch, groups, -1, n, u.shape[-1]).sum(2).reshape(like.shape)

        return (grads["GRAD_U"], grads["GRAD_DELTA"], grads["GRAD_A"].sum(0), per_group(grads["GRAD_B"], B),
                per_group(grads["GRAD_C"], C), grads["GRAD_D"].sum(0) if D is not None else None,
                grads["GRAD_Z"] if z is not None else None,
                grads["GRAD_BIAS"].sum(0) if delta_bias is not None else None)
