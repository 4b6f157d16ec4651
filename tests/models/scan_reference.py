"""The selective scan as its definition: one time step at a time (Gu & Dao 2023, Alg. 2). The chunked scan
is tested against it, and scripts/bench_scan.py times it ("unbind loop") beside mamba-ssm's loop layout."""

import torch
import torch.nn.functional as F


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False):
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_step(x):  # B or C as L tensors of (batch or 1, dim, N)
        if x.dim() == 2:
            return [x[None]] * length
        if x.dim() == 3:
            x = x[:, None]
        else:
            x = x.repeat_interleave(dim // x.shape[1], dim=1)
        return x.expand(batch, dim, *x.shape[2:]).unbind(-1)

    B, C = per_step(B), per_step(C)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t, (delta_t, u_t) in enumerate(zip(delta.unbind(-1), u.unbind(-1))):
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B[t]
        ys.append((h * C[t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y
