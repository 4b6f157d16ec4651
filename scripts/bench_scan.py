"""Selective scan, forward + backward, on this machine: the per-time-step loop (tests/models/scan_reference.py,
the baseline) against tune_xray's chunked pure-PyTorch scan, in one process, at two shapes of issue #4:

- MambaVision-T stage 3 (one 14×14 window at 224 px): batch 8, dim 160, L 196, N 8
- VMamba-S stage 1 (56×56 tokens, four scan directions of 96 channels): batch 8, dim 384, L 3136, N 1

Inputs follow the models' initialisation (Δ = softplus(·) in [0.001, 0.1], A = −(1…N)). Goals: ≥ 4× and
≥ 100× on a 2-core CPU.

    python scripts/bench_scan.py [--repeats 3]
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
          "VMamba-S stage 1": dict(batch=8, dim=384, length=3136, n=1, groups=4)}


def make_inputs(batch, dim, length, n, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(u=torch.randn(batch, dim, length, generator=g), delta=0.1 * torch.randn(batch, dim, length, generator=g),
                A=-torch.arange(1, n + 1.0).repeat(dim, 1), B=torch.randn(shape, generator=g),
                C=torch.randn(shape, generator=g), D=torch.ones(dim), delta_bias=dt + torch.log(-torch.expm1(-dt)))


def fwd_bwd_seconds(fn, inputs: dict, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        start = time.perf_counter()
        fn(**leaves, delta_softplus=True).square().mean().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reuse_freed_memory()  # as in training (run_phases), for both
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, best of {args.repeats}")
    for name, shape in SHAPES.items():
        inputs = make_inputs(**shape)
        loop = fwd_bwd_seconds(sequential_scan, inputs, args.repeats)
        ours = fwd_bwd_seconds(selective_scan, inputs, args.repeats)
        print(f"{name:24s} ({', '.join(f'{k} {v}' for k, v in shape.items() if v)}): "
              f"loop {1e3 * loop:8.1f} ms   chunked {1e3 * ours:7.1f} ms   {loop / ours:6.1f}×")


if __name__ == "__main__":
    main()
