"""Selective scan, forward + backward, on this machine: the per-time-step loop against tune_xray's chunked
pure-PyTorch scan, in one process, at two shapes of issue #4:

- MambaVision-T stage 3 (one 14×14 window at 224 px): batch 8, dim 160, L 196, N 8
- VMamba-S stage 1 (56×56 tokens, four scan directions of 96 channels): batch 8, dim 384, L 3136, N 1

Two loops are timed. "loop" is the field's CPU fallback: mamba-ssm's `selective_scan_ref` layout (ΔA and ΔBu
materialised as (batch, dim, L, N), then `h = dA[:, :, t] * h + dBu[:, :, t]`), which MambaVision and VMamba
run without the kernel, and which STACK_NOTES timed. Indexing one step of a full tensor costs a full-size
zero tensor per step in the backward, so "unbind loop" (tests/models/scan_reference.py, the tests' definition)
is also timed: the same loop written to avoid that, a stricter baseline.

Inputs follow the models' initialisation (Δ = softplus(·) in [0.001, 0.1], A = −(1…N)); a third row has the
steep decays of trained weights. Goals: ≥ 4× and ≥ 100× on a 2-core CPU.

    python scripts/bench_scan.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference lives with the tests
from tests.models.scan_reference import sequential_scan  # noqa: E402
from tune_xray.models.scan import selective_scan  # noqa: E402
from tune_xray.phases.common import reuse_freed_memory  # noqa: E402

SHAPES = {"MambaVision-T stage 3": dict(batch=8, dim=160, length=196, n=8, groups=None),
          "VMamba-S stage 1": dict(batch=8, dim=384, length=3136, n=1, groups=4),
          "MambaVision-T stage 3, steep decays": dict(batch=8, dim=160, length=196, n=8, groups=None, steep=True)}


def make_inputs(batch, dim, length, n, groups, steep=False, seed=0):
    """At initialisation; `steep`: Δ ≈ 3 and |A| up to 32, |ΔA| ≈ 100 as trained weights can reach, which
    leaves no safe chunk length: the log-step path."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    dt = torch.full_like(dt, 3.0) if steep else dt
    shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(u=torch.randn(batch, dim, length, generator=g), delta=0.1 * torch.randn(batch, dim, length, generator=g),
                A=-(4 if steep else 1) * torch.arange(1, n + 1.0).repeat(dim, 1), B=torch.randn(shape, generator=g),
                C=torch.randn(shape, generator=g), D=torch.ones(dim), delta_bias=dt + torch.log(-torch.expm1(-dt)))


def indexing_loop(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The per-step loop in mamba-ssm's `selective_scan_ref` layout, for time-varying B/C."""
    delta = delta + delta_bias[:, None] if delta_bias is not None else delta
    delta = torch.nn.functional.softplus(delta) if delta_softplus else delta
    if B.dim() == 4:  # (batch, groups, N, L): per channel
        B, C = (x.repeat_interleave(u.shape[1] // x.shape[1], dim=1) for x in (B, C))
    else:
        B, C = B[:, None], C[:, None]
    B, C = B.transpose(2, 3), C.transpose(2, 3)  # (batch, dim or 1, L, N)
    dA = torch.exp(delta[..., None] * A[:, None])  # (batch, dim, L, N)
    dBu = (delta * u)[..., None] * B
    h, ys = u.new_zeros(*u.shape[:2], A.shape[1]), []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h * C[:, :, t]).sum(-1))
    return torch.stack(ys, dim=2) + D[:, None] * u


def fwd_bwd_seconds(fn, inputs: dict, repeats: int, budget: float = 10.0) -> float:
    """Best of `repeats` timed runs after a warm-up run; stops early once `budget` seconds are spent (the
    slow loops at VMamba's L), and a single run that long counts as timed."""
    times = []
    while len(times) <= repeats and (len(times) < 2 or sum(times) < budget):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        start = time.perf_counter()
        fn(**leaves, delta_softplus=True).square().mean().backward()
        times.append(time.perf_counter() - start)
        if len(times) == 1 and times[0] > budget:
            break
    return min(times[1:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    reuse_freed_memory()  # as in training (run_phases), for both
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, best of {args.repeats}")
    for name, shape in SHAPES.items():
        inputs = make_inputs(**shape)
        ours = fwd_bwd_seconds(selective_scan, inputs, args.repeats)
        sizes = ", ".join(f"{k} {v}" for k, v in shape.items() if k != "steep" and v)
        print(f"{name} ({sizes}): tune_xray {1e3 * ours:.1f} ms")
        for baseline, fn in [("loop", indexing_loop), ("unbind loop", sequential_scan)]:
            seconds = fwd_bwd_seconds(fn, inputs, args.repeats)
            print(f"    {baseline:12s} {1e3 * seconds:9.1f} ms   tune_xray is {seconds / ours:6.1f}× faster")


if __name__ == "__main__":
    main()
