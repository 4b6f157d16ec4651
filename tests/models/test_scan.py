"""The chunked selective scan against the one-step-at-a-time definition (tests/models/scan_reference.py)."""

import pytest
import torch

from tune_xray.models.scan import _MAX_CHUNK, scan_backend, selective_scan

from .scan_reference import sequential_scan


def make_inputs(batch, dim, length, n, groups=None, b_layout="batch", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"batch": (batch, n, length), "groups": (batch, groups, n, length), "fixed": (dim, n)}[b_layout]
    return dict(u=torch.randn(batch, dim, length, generator=g), delta=scale * torch.randn(batch, dim, length, generator=g),
                A=-8 * scale * torch.rand(dim, n, generator=g), B=torch.randn(shape, generator=g),
                C=torch.randn(shape, generator=g), D=torch.randn(dim, generator=g),
                z=torch.randn(batch, dim, length, generator=g), delta_bias=torch.randn(dim, generator=g))


def values_and_grads(scan, inputs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves, delta_softplus=True)
    weights = torch.linspace(-1, 1, y.shape[-1])  # a loss that weighs every step differently
    return [y.detach(), *torch.autograd.grad((y * weights).sum(), list(leaves.values()))]


@pytest.mark.parametrize("shape", [
    dict(batch=2, dim=6, length=37, n=4),                                      # one chunk
    dict(batch=2, dim=8, length=300, n=3, groups=4, b_layout="groups"),      # VMamba's grouped B/C, chunk ends
    dict(batch=1, dim=4, length=2 * _MAX_CHUNK + 5, n=16),                    # long: several full chunks + a tail
    dict(batch=2, dim=4, length=50, n=2, b_layout="fixed"),                   # time-invariant B/C
    dict(batch=2, dim=4, length=64, n=2, scale=30.0),                         # steep decays: short chunks
])
def test_chunked_scan_equals_the_sequential_definition(shape):
    inputs = make_inputs(**shape)
    ours, reference = values_and_grads(selective_scan, inputs), values_and_grads(sequential_scan, inputs)
    for name, a, b in zip(["y", *inputs], ours, reference):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_no_overflow_at_large_decay():
    inputs = make_inputs(batch=2, dim=4, length=400, n=16, scale=1.0)
    inputs["A"] = -torch.full((4, 16), 1e4)  # |ΔA| up to ~1e4: e^{-cumsum} would overflow without the guard
    y, *grads = values_and_grads(selective_scan, inputs)
    assert all(torch.isfinite(t).all() for t in [y, *grads])
    reference = values_and_grads(sequential_scan, inputs)[0]
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_last_state_and_dtype():
    inputs = make_inputs(batch=2, dim=3, length=20, n=4)
    y, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert state.shape == (2, 3, 4)
    half = {k: v.bfloat16() for k, v in inputs.items()}
    assert selective_scan(**half, delta_softplus=True).dtype == torch.bfloat16  # state kept in fp32 inside


def test_backend_is_named():
    assert "chunked" in scan_backend()
