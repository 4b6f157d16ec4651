"""The Triton scan kernels compiled for real GPUs on this CPU machine (Triton's own compiler and ptxas; no GPU):
every variant the models launch builds for sm_80 and sm_90 and keeps its values in registers. The interpreter
tests (test_scan.py) check the numbers but run any Python the compiler would refuse (a loop-carried variable whose
type changes, as the forward kernel once had)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_xray.models import scan_triton

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """scripts/scan_kernels.py's rows: one per (target, kernel, variant, dtype)."""
    out = tmp_path_factory.mktemp("scan_kernels") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "scan_kernels.py"), "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.is_file(), run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    sys.path.insert(0, str(ROOT / "scripts"))
    from scan_kernels import DTYPES, MODELS, VARIANTS

    assert set(MODELS) <= set(VARIANTS) and {v["n"] for v in VARIANTS.values()} == {1, 8, 16}
    expected = {(t, k, v, d) for t in ("sm_80", "sm_90") for k in ("forward", "backward") for v in VARIANTS
                for d in DTYPES}
    assert {(r["target"], r["kernel"], r["variant"], r["dtype"]) for r in compiled} == expected
    errors = [f"{name(r)}: {r['error']}" for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)


def name(row: dict) -> str:
    return f"{row['target']} {row['kernel']} {row['variant']} {row['dtype']}"


def test_no_kernel_spills_and_each_fits_its_register_budget(compiled):
    """ptxas' report of each compiled kernel: no spill stores or loads, and at most 128 registers per thread
    (scan_triton.TILES: two 8-warp programs per SM), so a change that brings spills back fails here."""
    built = [r for r in compiled if "error" not in r]  # the others fail the test above
    assert built
    over = [f"{name(r)}: {r['registers']} registers, spills {r['spill_stores']}/{r['spill_loads']} B, stack "
            f"{r['stack']} B" for r in built
            if r["spill_stores"] or r["spill_loads"] or r["stack"] or not 0 < r["registers"] <= 128]
    assert not over, "\n".join(over)


SHAPES = {"MambaVision-T2 stage 3": (160, 8, 1), "MambaVision-T2 stage 4": (320, 8, 1),
          "VMamba-S stage 1": (768, 1, 4), "N16, dim 40": (40, 16, 1), "N16, 4 groups of 24": (96, 16, 4),
          "tiny: groups narrower than N": (8, 4, 4)}


@pytest.mark.parametrize("dim, n, groups", SHAPES.values(), ids=SHAPES.keys())
def test_the_b_and_c_gradient_partials_are_no_larger_than_u(dim, n, groups):
    """Per-block B/C partial sums: at most u's size, or — where a group has fewer channels than N — one block per
    group, B's own size."""
    meta = dict(device="meta")
    u = torch.empty(2, dim, 100, **meta)
    bc = torch.empty(2, n, 100, **meta) if groups == 1 else torch.empty(2, groups, n, 100, **meta)
    args = (u, u, torch.empty(dim, n, **meta), bc, bc, None, None, None, True)
    _, (_, _, states) = scan_triton.forward_launch(*args)
    _, grads = scan_triton.backward_launch(u, *args, states)
    assert grads["GRAD_B"].numel() <= max(u.numel(), bc.numel())
    assert grads["GRAD_B"].shape == grads["GRAD_C"].shape


def test_a_state_size_beyond_the_planned_tiles_is_refused():
    with pytest.raises(ValueError, match="d_state up to 16, got 32; use model.scan_backend=torch"):
        scan_triton.plan(dim=64, n_state=32, groups=1, length=100)
