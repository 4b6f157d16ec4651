"""Every Triton selective-scan kernel the models launch, compiled for real GPU targets by Triton's own compiler — no
GPU needed — with what ptxas says of each: registers, spill stores and loads, stack frame, and shared memory.

`TRITON_INTERPRET=1` runs a kernel as Python and accepts code the compiler rejects, so the interpreter tests alone
cannot show that a kernel builds. Here each launch is specialised exactly as Triton's launcher would specialise it
(the argument types, alignments and the integers equal to 1 of the real call, with meta tensors for data), compiled
to PTX and cubin for sm_80 (A100) and sm_90 (H100/H200), and ptxas' `-v` report is read. Exit 1 when a kernel does
not compile or spills: tests/models/test_scan_compile.py runs this in CI.

Variants: the calls MambaVision and VMamba make (N 8 and N 1 with four groups; D, Δ bias, softplus, no z; the
low-rank Δ arrives as fp32), and mamba-ssm's interface beyond them (N 1, 8, 16, each with z and D and without
either; groups narrower than a block's default width), each with fp32 and bf16 inputs.

    python scripts/scan_kernels.py [--targets sm_80,sm_90] [--json OUT]   # the table; exit 1 on an error or a spill
    python scripts/scan_kernels.py --sweep [--targets sm_90]              # candidate tiles per N (TILES's source)
    python scripts/scan_kernels.py --device cuda                          # on a GPU: the loaded kernels' registers
                                                                          # and spills, and parity with the definition
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret (before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the definition lives with the tests
from tune_xray.models import scan_triton  # noqa: E402

# name → the scan's shape (a real layer's dims and length, which decide the launch's integer specialisation)
MODELS = {
    "MambaVision-T2 stage 3": dict(n=8, groups=1, dim=160, length=196, z=False, D=True, low_rank=True),
    "VMamba-S stage 1": dict(n=1, groups=4, dim=768, length=3136, z=False, D=True, low_rank=True),
}
INTERFACE = {f"N{n}{' z D' if zd else ''}": dict(n=n, groups=1, dim=512, length=1024, z=zd, D=zd, low_rank=False)
             for n in (1, 8, 16) for zd in (True, False)}
INTERFACE["N16 z D, 4 groups of 24"] = dict(n=16, groups=4, dim=96, length=1000, z=True, D=True, low_rank=False)
VARIANTS = {**MODELS, **INTERFACE}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


def scan_inputs(n, groups, dim, length, z, D, low_rank, dtype, device="meta", batch=1, seed=0):
    """The scan's arguments as a layer passes them (Δ in fp32 when it comes from the low-rank projection)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape, scale=1.0, dt=dtype: (scale * torch.randn(*shape, generator=g)).to(device, dt)  # noqa: E731
    if device == "meta":
        rand = lambda *shape, scale=1.0, dt=dtype: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
    bc = (batch, n, length) if groups == 1 else (batch, groups, n, length)
    return dict(u=rand(batch, dim, length), delta=rand(batch, dim, length, scale=0.5,
                                                       dt=torch.float32 if low_rank else dtype),
                A=-(torch.rand(dim, n, generator=g) * 4).to(device) if device != "meta"
                else torch.empty(dim, n, device="meta"),
                B=rand(*bc), C=rand(*bc), D=rand(dim, dt=torch.float32) if D else None,
                z=rand(batch, dim, length) if z else None, delta_bias=rand(dim, scale=0.5, dt=torch.float32))


def launches(variant: dict, dtype: torch.dtype, device="meta") -> dict[str, scan_triton.Launch]:
    """The forward and backward launches of one call, as scan_triton.Core makes them."""
    x = scan_inputs(**variant, dtype=dtype, device=device)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    forward, (y, _last, states) = scan_triton.forward_launch(*args)
    backward, _grads = scan_triton.backward_launch(torch.empty_like(y), *args, states)
    return {"forward": forward, "backward": backward}


def compile_launch(launch: scan_triton.Launch, target: GPUTarget):
    """Compile `launch` for `target` with the specialisation Triton's launcher gives its arguments (the binder and
    argument packing of triton.runtime.jit, as JITFunction.run calls them). Returns (kernel, ptxas -v report)."""
    kernel, backend = launch.kernel, make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.args, num_warps=launch.num_warps, debug=False)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    report = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(report):
        triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, report.getvalue()


def ptxas_resources(report: str) -> dict:
    """Registers, spill stores and loads, and stack frame (bytes per thread) from ptxas' `-v` report."""
    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else None
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack=number(r"(\d+) bytes stack frame"))


def compile_row(job: tuple) -> dict:
    """One (target, variant, dtype, kernel[, tile]) compiled: its resources, or the error."""
    target, name, dtype, which, tile = job
    variant = VARIANTS.get(name) or SWEEP_VARIANTS[name]
    if tile is not None:
        scan_triton.TILES[triton.next_power_of_2(variant["n"])] = tile
    launch = launches(variant, DTYPES[dtype])[which]
    row = dict(target=target, variant=name, dtype=dtype, kernel=which, num_warps=launch.num_warps,
               tile=[launch.args[k] for k in ("BLOCK_D", "BLOCK_N", "BLOCK_L")])
    try:
        compiled, report = compile_launch(launch, TARGETS[target])
    except Exception as error:  # a kernel that does not compile is this row's result
        return dict(row, error=f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
    return dict(row, **ptxas_resources(report), shared=compiled.metadata.shared)


def compiled_rows(jobs: list[tuple]) -> list[dict]:
    with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return list(pool.map(compile_row, jobs))


def failed(row: dict) -> bool:
    return "error" in row or row["registers"] is None or row["spill_stores"] or row["spill_loads"]


def print_table(rows: list[dict]) -> None:
    head = ("target", "kernel", "variant", "dtype", "tile D×N×L", "warps", "regs", "spill st/ld B", "stack B",
            "smem B")
    lines = [head]
    for r in rows:
        tile = "×".join(map(str, r["tile"]))
        if "error" in r:
            lines.append((r["target"], r["kernel"], r["variant"], r["dtype"], tile, str(r["num_warps"]),
                          "ERROR", r["error"], "", ""))
        else:
            lines.append((r["target"], r["kernel"], r["variant"], r["dtype"], tile, str(r["num_warps"]),
                          str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["stack"]),
                          str(r["shared"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


# the sweep: candidate (BLOCK_D, BLOCK_L, warps) for every BLOCK_N the plan takes, at a mid-size shape with z and D
# (the most live values)
SWEEP_TILES = {1: [(32, 32, 8), (64, 32, 8), (32, 64, 8), (32, 32, 4), (64, 64, 8)],
               2: [(32, 16, 8), (32, 32, 8), (16, 32, 8), (64, 16, 8)],
               4: [(16, 16, 8), (16, 32, 8), (32, 16, 8), (32, 8, 8)],
               8: [(16, 16, 8), (32, 8, 8), (8, 16, 4), (16, 8, 4), (16, 32, 8), (32, 16, 8)],
               16: [(16, 4, 8), (16, 8, 4), (16, 8, 8), (32, 4, 8), (16, 16, 8)]}
SWEEP_VARIANTS = {f"N{n} z D": dict(n=n, groups=1, dim=512, length=1024, z=True, D=True, low_rank=False)
                  for n in SWEEP_TILES}


def parity(variant: dict, dtype: torch.dtype, device: str, backend: str = "triton") -> float:
    """max |ours − definition| / max |definition| over y and every gradient, at batch 2 and L ≤ 300 (bf16 inputs:
    against the definition on the same bf16 values in fp32)."""
    from tests.models.scan_reference import sequential_scan
    from tune_xray.models.scan import selective_scan

    x = scan_inputs(**{**variant, "length": min(variant["length"], 300)}, dtype=dtype, device=device, batch=2)
    x = {k: v for k, v in x.items() if v is not None}
    results = []
    for scan, inputs in ((lambda **kw: selective_scan(**kw, backend=backend), x),
                         (sequential_scan, {k: v.float() for k, v in x.items()})):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y = scan(**leaves, delta_softplus=True)
        loss = (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device).bfloat16().float()).sum()
        results.append([y.detach().float(), *[g.float() for g in torch.autograd.grad(loss, list(leaves.values()))]])
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*results))


def gpu_check() -> int:
    """On this machine's GPU: each variant's kernels loaded (registers and spills as the driver reports them) and
    the Triton backend against the step-by-step definition. Exit 1 on a spill or an fp32 error above 1e-4."""
    target = triton.runtime.driver.active.get_current_target()
    print(f"{torch.cuda.get_device_name()} (sm_{target.arch})")
    lines = [("variant", "dtype", "forward regs/spills", "backward regs/spills", "max rel. error (y, grads)")]
    spills, worst = 0, 0.0
    for (name, variant), (dtype_name, dtype) in itertools.product(VARIANTS.items(), DTYPES.items()):
        loaded = []
        for launch in launches(variant, dtype).values():
            compiled, _ = compile_launch(launch, target)
            compiled._init_handles()
            loaded.append(f"{compiled.n_regs}/{compiled.n_spills}")
            spills += compiled.n_spills
        error = parity(variant, dtype, "cuda")
        worst = max(worst, error if dtype == torch.float32 else 0.0)
        lines.append((name, dtype_name, *loaded, f"{error:.1e}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    print(f"spills: {spills}; worst fp32 relative error {worst:.1e}")
    return 1 if spills or worst > 1e-4 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--targets", default="sm_80,sm_90", help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--sweep", action="store_true", help="compile the candidate tiles per N instead")
    parser.add_argument("--device", choices=["meta", "cuda"], default="meta",
                        help="cuda: load the kernels on this machine's GPU and check parity there")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return gpu_check()
    targets = args.targets.split(",")
    if unknown := set(targets) - set(TARGETS):
        parser.error(f"--targets: unknown {sorted(unknown)}; known: {', '.join(TARGETS)}")
    if args.sweep:
        jobs = [(t, f"N{n} z D", "bf16", k, tile) for t in targets for n, tiles in SWEEP_TILES.items()
                for tile in tiles for k in ("forward", "backward")]
    else:
        jobs = [(t, name, dtype, k, None) for t in targets for name in VARIANTS for dtype in DTYPES
                for k in ("forward", "backward")]
    rows = compiled_rows(jobs)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if failed(r)]
    print(f"{len(rows)} kernels compiled for {', '.join(targets)}: {len(bad)} failed or spilled")
    return 1 if bad and not args.sweep else 0


if __name__ == "__main__":
    sys.exit(main())
