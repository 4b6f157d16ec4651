"""The chunked selective scan against the one-step-at-a-time definition (tests/models/scan_reference.py)."""

import pytest
import torch

import torch.nn.functional as F

from tune_xray.models.scan import _MAX_CHUNK, _chunk_for, scan_backend, selective_scan

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


@pytest.mark.parametrize("shape, plan", [
    (dict(batch=2, dim=6, length=37, n=4, scale=0.05), "one chunk"),
    (dict(batch=2, dim=8, length=300, n=3, groups=4, b_layout="groups", scale=0.05), "chunks"),  # VMamba's B/C
    (dict(batch=1, dim=4, length=2 * _MAX_CHUNK + 5, n=16, scale=0.05), "padded chunks"),
    (dict(batch=2, dim=4, length=211, n=2, scale=0.5), "padded chunks"),       # prime L: a padded tail
    (dict(batch=2, dim=4, length=50, n=2, b_layout="fixed", scale=0.05), "one chunk"),  # time-invariant B/C
    (dict(batch=2, dim=4, length=64, n=2), "log-step"),                        # steep decays
    (dict(batch=2, dim=4, length=100, n=1, groups=2, b_layout="groups", scale=30.0), "log-step"),
])
def test_chunked_scan_equals_the_sequential_definition(shape, plan):
    inputs = make_inputs(**shape)
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    chunk, length = _chunk_for(delta, inputs["A"]), shape["length"]
    assert plan == ("log-step" if chunk is None else "one chunk" if chunk == length
                    else "chunks" if length % chunk == 0 else "padded chunks")
    ours, reference = values_and_grads(selective_scan, inputs), values_and_grads(sequential_scan, inputs)
    for name, a, b in zip(["y", *inputs], ours, reference):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_no_overflow_at_large_decay():  # e^{-cumsum} would overflow in any chunk: the log-step scan
    inputs = make_inputs(batch=2, dim=4, length=400, n=16, scale=1.0)
    inputs["A"] = -torch.full((4, 16), 1e4)  # |ΔA| up to ~1e4
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
