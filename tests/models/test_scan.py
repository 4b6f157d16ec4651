"""The selective scan against the one-step-at-a-time definition (tests/models/scan_reference.py): values and
every gradient, on each backend this machine can run, and what the torch backend keeps for backward."""

import pytest
import torch

from tune_xray.models.scan import available_backends, chunk_length, resolve_backend, selective_scan

from .scan_reference import sequential_scan


def make_inputs(batch, dim, length, n, groups=None, b_layout="batch", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"batch": (batch, n, length), "groups": (batch, groups, n, length), "fixed": (dim, n)}[b_layout]
    return dict(u=torch.randn(batch, dim, length, generator=g),
                delta=scale * torch.randn(batch, dim, length, generator=g),
                A=-8 * scale * torch.rand(dim, n, generator=g), B=torch.randn(shape, generator=g),
                C=torch.randn(shape, generator=g), D=torch.randn(dim, generator=g),
                z=torch.randn(batch, dim, length, generator=g), delta_bias=torch.randn(dim, generator=g))


def values_and_grads(scan, inputs, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves, delta_softplus=True, **kwargs)
    weights = torch.linspace(-1, 1, y.shape[-1])  # a loss that weighs every step differently
    return [y.detach(), *torch.autograd.grad((y * weights).sum(), list(leaves.values()))]


def assert_matches(ours, reference, names, rtol=1e-5):
    for name, a, b in zip(names, ours, reference):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


SHAPES = {
    "short: one chunk, padded": dict(batch=2, dim=6, length=5, n=4, scale=0.05),
    "chunks, padded tail": dict(batch=2, dim=6, length=37, n=4, scale=0.05),
    "VMamba's grouped B/C": dict(batch=2, dim=8, length=300, n=3, groups=4, b_layout="groups", scale=0.05),
    "many chunks, N 16": dict(batch=1, dim=4, length=517, n=16, scale=0.05),
    "prime L": dict(batch=2, dim=4, length=211, n=2, scale=0.5),
    "time-invariant B/C": dict(batch=2, dim=4, length=50, n=2, b_layout="fixed", scale=0.05),
    "MambaVision window 14²": dict(batch=2, dim=4, length=196, n=8, scale=0.3),
    "steep decays": dict(batch=2, dim=4, length=64, n=2),
    "very steep, N 1, groups": dict(batch=2, dim=4, length=100, n=1, groups=2, b_layout="groups", scale=30.0),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the Triton interpreter: exp(90) = inf in σ(−90)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_scan_equals_the_sequential_definition(shape, backend):
    if backend not in available_backends("cpu"):
        pytest.skip("Triton runs here only under TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    if backend == "triton" and shape["length"] > 300:
        pytest.skip("the Triton interpreter is slow; the long case runs on the torch backend")
    inputs = make_inputs(**shape)
    assert_matches(values_and_grads(selective_scan, inputs, backend=backend),
                   values_and_grads(sequential_scan, inputs), ["y", *inputs])


@pytest.mark.parametrize("layout", ["grouped", "shared"])
def test_a_low_rank_delta_is_the_projection_it_stands_for(layout):
    """delta_proj_weight: Δ = W·delta inside the scan (recomputed in backward), as if W·delta were passed."""
    g = torch.Generator().manual_seed(1)
    inputs = make_inputs(batch=2, dim=8, length=40, n=2, groups=4 if layout == "grouped" else None,
                         b_layout="groups" if layout == "grouped" else "batch", scale=0.3)
    low = torch.randn(2, 4, 3, 40, generator=g) if layout == "grouped" else torch.randn(2, 3, 40, generator=g)
    weight = torch.randn(4, 2, 3, generator=g) if layout == "grouped" else torch.randn(8, 3, generator=g)
    del inputs["delta"]
    inputs.update(delta=low, delta_proj_weight=weight)

    def projected_first(delta, delta_proj_weight, **rest):
        return sequential_scan(delta=torch.matmul(delta_proj_weight, delta).reshape(2, 8, 40), **rest)

    assert_matches(values_and_grads(selective_scan, inputs, backend="torch"),
                   values_and_grads(projected_first, inputs), ["y", *inputs])


def test_decays_that_underflow_are_exact_and_finite():
    """|ΔA| up to ~1e4: e^{ΔA} is 0 in fp32, where an e^{−cumsum} form would overflow in any chunk."""
    inputs = make_inputs(batch=2, dim=4, length=400, n=16, scale=1.0)
    inputs["A"] = -torch.full((4, 16), 1e4)
    y, *grads = values_and_grads(selective_scan, inputs, backend="torch")
    assert all(torch.isfinite(t).all() for t in [y, *grads])
    assert_matches([y, *grads], values_and_grads(sequential_scan, inputs), ["y", *inputs])


def test_last_state_and_dtype():
    inputs = make_inputs(batch=2, dim=3, length=20, n=4)
    y, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="torch")
    assert state.shape == (2, 3, 4) and state.dtype == torch.float32
    # the last state is h_L: the scan of a sequence one step longer with no input (Δ ≈ 0) ends on it
    half = {k: v.bfloat16() for k, v in inputs.items()}
    leaves = {k: v.requires_grad_() for k, v in half.items()}
    y = selective_scan(**leaves, delta_softplus=True, backend="torch")
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16  # the state kept in fp32 inside
    assert all(leaf.grad.dtype == torch.bfloat16 for leaf in leaves.values())  # each gradient in its input's dtype


def test_the_chunk_length_depends_on_the_length_alone():
    assert [chunk_length(n) for n in (3136, 784, 196, 49, 64, 37)] == [8, 8, 7, 7, 8, 8]


def test_backward_keeps_only_the_inputs_and_the_chunk_states():
    """The saved-tensor budget of one call: its inputs (as given) and the states entering each chunk."""
    inputs = make_inputs(batch=2, dim=16, length=256, n=1, groups=4, b_layout="groups", scale=0.05)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(**leaves, delta_softplus=True, backend="torch")
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in leaves.values())
    states_bytes = 2 * 16 * 1 * (256 // chunk_length(256)) * 4
    assert sum(saved.values()) == inputs_bytes + states_bytes


def test_backend_resolution():
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == available_backends("cpu")[0]
    with pytest.raises(ValueError, match="scan_backend=kernel cannot run on cpu"):
        resolve_backend("kernel", "cpu")
