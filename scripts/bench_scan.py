"""Selective scan, forward + backward, on this machine: the per-time-step loop against tune_xray's torch backend
(scan.TorchCore) in one process — time, and what autograd keeps for backward — at three shapes:

- MambaVision-T stage 3 (one 14×14 window at 224 px): batch 8, dim 160, L 196, N 8
- VMamba-S stage 1 (56×56 tokens, four scan directions of 192 channels: ssm_ratio 2 × 96): batch 8, dim 768,
  L 3136, N 1
- MambaVision-T stage 3 with the steep decays of trained weights

Two loops are the baselines. "loop" is the field's CPU fallback: mamba-ssm's `selective_scan_ref` layout (ΔA and
ΔBu materialised as (batch, dim, L, N), then `h = dA[:, :, t] * h + dBu[:, :, t]`), which MambaVision and VMamba
run without the kernel. Indexing one step of a full tensor costs a full-size zero tensor per step in the
backward, so "unbind loop" (tests/models/scan_reference.py, the tests' definition) is also timed: the same loop
written to avoid that, a stricter baseline.

Then whole networks (`--networks`, default vmamba_s): MiB kept for backward per image at 224 px, fp32, with and
without `model.grad_checkpointing` (batch 2 minus batch 1; weights not counted).

Inputs follow the models' initialisation (Δ = softplus(·) in [0.001, 0.1], A = −(1…N)). Goals on a 2-core CPU:
≥ 4× and ≥ 100× the loop; ≤ 20 MiB kept per image by one VMamba-S stage-1 call, ≤ 300 by vmamba_s, ≤ 80 with
gradient checkpointing.

On a GPU (`--device cuda`, batch 64) the rows are the backends instead: our Triton kernel against the torch
backend as it is and under `torch.compile` (fullgraph, inductor), and mamba-ssm's kernel where it is installed;
ms per fwd+bwd and each one's time over Triton's.

    python scripts/bench_scan.py [--repeats 10] [--networks vmamba_s,mambavision_t2]
    python scripts/bench_scan.py --device cuda [--batch 64]
"""

from __future__ import annotations

import argparse
import functools
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
          "VMamba-S stage 1": dict(batch=8, dim=768, length=3136, n=1, groups=4),
          "MambaVision-T stage 3, steep decays": dict(batch=8, dim=160, length=196, n=8, groups=None, steep=True)}


def make_inputs(batch, dim, length, n, groups, steep=False, seed=0):
    """At initialisation; `steep`: Δ ≈ 3 and |A| up to 32, |ΔA| ≈ 100 as trained weights can reach, which
    leaves no safe chunk length: the log-step path."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    dt = torch.full_like(dt, 3.0) if steep else dt
    shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(u=torch.randn(batch, dim, length, generator=g),
                delta=0.1 * torch.randn(batch, dim, length, generator=g),
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


def kept_for_backward(run, exclude=()) -> int:
    """Bytes autograd keeps for backward while `run()` runs: each storage once, `exclude`'s (weights) not counted."""
    kept, skip = {}, {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def kept_mib_per_call(fn, inputs: dict) -> float:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    return kept_for_backward(lambda: fn(**leaves, delta_softplus=True)) / 2**20 / next(iter(inputs.values())).shape[0]


def network_mib_per_image(name: str, checkpointing: bool, size: int = 224) -> float:
    """What a whole backbone keeps for backward per image: batch 2 minus batch 1, fp32, train mode."""
    import timm

    import tune_xray.models  # noqa: F401  (registers MambaVision and VMamba)

    model = timm.create_model(name, num_classes=0)
    model.set_grad_checkpointing(checkpointing)
    weights = list(model.parameters())
    kept = [kept_for_backward(lambda: model(torch.randn(n, 3, size, size)), weights) for n in (1, 2)]
    return (kept[1] - kept[0]) / 2**20


def fwd_bwd_seconds(fn, inputs: dict, repeats: int, budget: float = 10.0) -> float:
    """Best of `repeats` timed runs after a warm-up run; stops early once `budget` seconds are spent (the
    slow loops at VMamba's L), and a single run that long counts as timed. On CUDA each run ends synchronised."""
    times = []
    sync = torch.cuda.synchronize if next(iter(inputs.values())).is_cuda else (lambda: None)
    while len(times) <= repeats and (len(times) < 2 or sum(times) < budget):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        sync()
        start = time.perf_counter()
        fn(**leaves, delta_softplus=True).square().mean().backward()
        sync()
        times.append(time.perf_counter() - start)
        if len(times) == 1 and times[0] > budget:
            break
    return min(times[1:] or times)


def gpu_backends(args) -> None:
    """Each backend that runs on this GPU, at each shape (batch `args.batch`): ms per fwd+bwd, and over Triton's."""
    from tune_xray.models.scan import available_backends

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fwd+bwd, fp32, best of {args.repeats}")
    backends = {name: functools.partial(selective_scan, backend=name) for name in available_backends("cuda")}
    backends["torch, compiled"] = torch.compile(functools.partial(selective_scan, backend="torch"), fullgraph=True,
                                                dynamic=False)
    for name, shape in SHAPES.items():
        inputs = {k: v.cuda() for k, v in make_inputs(**{**shape, "batch": args.batch}).items()}
        times = {backend: fwd_bwd_seconds(fn, inputs, args.repeats) for backend, fn in backends.items()}
        print(f"{name} (batch {args.batch}):")
        for backend, seconds in times.items():
            ratio = f"  {seconds / times['triton']:5.1f}× Triton's time" if "triton" in times else ""
            print(f"    {backend:16s} {1e3 * seconds:8.2f} ms{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--networks", default="vmamba_s", help="comma-separated backbones for the per-image "
                        "memory rows ('' for none)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="batch of the --device cuda rows")
    args = parser.parse_args()
    if args.device == "cuda":
        return gpu_backends(args)
    reuse_freed_memory()  # as in training (run_phases), for both
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, best of {args.repeats}")
    ours_fn = functools.partial(selective_scan, backend="torch")
    for name, shape in SHAPES.items():
        inputs = make_inputs(**shape)
        ours, ours_kept = fwd_bwd_seconds(ours_fn, inputs, args.repeats), kept_mib_per_call(ours_fn, inputs)
        sizes = ", ".join(f"{k} {v}" for k, v in shape.items() if k != "steep" and v)
        print(f"{name} ({sizes}): tune_xray {1e3 * ours:.1f} ms, keeps {ours_kept:.1f} MiB per image")
        for baseline, fn in [("loop", indexing_loop), ("unbind loop", sequential_scan)]:
            seconds, kept = fwd_bwd_seconds(fn, inputs, args.repeats), kept_mib_per_call(fn, inputs)
            print(f"    {baseline:12s} {1e3 * seconds:9.1f} ms   tune_xray is {seconds / ours:6.1f}× faster;  "
                  f"keeps {kept:8.1f} MiB per image ({kept / ours_kept:.0f}× tune_xray's)")
    for name in filter(None, args.networks.split(",")):
        plain, checkpointed = network_mib_per_image(name, False), network_mib_per_image(name, True)
        print(f"{name} at 224 px, fp32: keeps {plain:.0f} MiB per image for backward; "
              f"{checkpointed:.0f} MiB with model.grad_checkpointing")


if __name__ == "__main__":
    main()
