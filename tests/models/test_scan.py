"""The selective scan against the one-step-at-a-time definition (tests/models/scan_reference.py): values, every
gradient and the last state, on each backend this machine can run (the Triton kernel under TRITON_INTERPRET=1 on
CPU), for every optional input on and off, every layout of B and C, a low-rank Δ and bf16 inputs; what the torch
backend keeps for backward; the torch backend under torch.compile. Compiling the Triton kernels for real GPUs is
tests/models/test_scan_compile.py."""

import pytest
import torch

from tune_xray.models.scan import available_backends, chunk_length, resolve_backend, selective_scan

from .scan_reference import sequential_scan

BACKENDS = ["torch", "triton"]


def make_inputs(batch, dim, length, n, groups=None, b_layout="batch", scale=1.0, seed=0, c_layout=None):
    g = torch.Generator().manual_seed(seed)

    def projection(layout):
        if layout == "strided":  # B and C as the models make them: slices of one projection's output
            return torch.randn(batch, 2 * n + 3, length, generator=g)[:, 3:3 + n]
        shape = {"batch": (batch, n, length), "groups": (batch, groups, n, length), "fixed": (dim, n)}[layout]
        return torch.randn(shape, generator=g)

    return dict(u=torch.randn(batch, dim, length, generator=g),
                delta=scale * torch.randn(batch, dim, length, generator=g),
                A=-8 * scale * torch.rand(dim, n, generator=g), B=projection(b_layout),
                C=projection(c_layout or b_layout), D=torch.randn(dim, generator=g),
                z=torch.randn(batch, dim, length, generator=g), delta_bias=torch.randn(dim, generator=g))


def values_and_grads(scan, inputs, softplus=True, **kwargs):
    """y, every input's gradient (in `inputs`' order) and the last state."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, last = scan(**leaves, delta_softplus=softplus, return_last_state=True, **kwargs)
    # a loss that weighs every step differently, by weights exact in bf16 (so ∂L/∂y is the same in every dtype)
    weights = torch.linspace(-1, 1, y.shape[-1], device=y.device).bfloat16().float()
    return [y.detach(), *torch.autograd.grad((y * weights).sum(), list(leaves.values())), last.detach()]


def assert_matches(ours, reference, names, rtol=1e-5):
    for name, a, b in zip([*names, "last state"], ours, reference, strict=True):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def needs(backend):
    if backend not in available_backends("cpu"):
        pytest.skip("Triton runs here only under TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")


SHAPES = {
    "short: one chunk, padded": dict(batch=2, dim=6, length=5, n=4, scale=0.05),
    "chunks, padded tail": dict(batch=2, dim=6, length=37, n=4, scale=0.05),
    "VMamba's grouped B/C": dict(batch=2, dim=8, length=300, n=3, groups=4, b_layout="groups", scale=0.05),
    "many chunks, N 16": dict(batch=1, dim=4, length=517, n=16, scale=0.05),
    "N 16 over 24 channels: Triton's widened block": dict(batch=1, dim=24, length=12, n=16, scale=0.05),
    "prime L": dict(batch=2, dim=4, length=211, n=2, scale=0.5),
    "time-invariant B/C": dict(batch=2, dim=4, length=50, n=2, b_layout="fixed", scale=0.05),
    "MambaVision window 14²": dict(batch=2, dim=4, length=196, n=8, scale=0.3),
    "steep decays": dict(batch=2, dim=4, length=64, n=2),
    "very steep, N 1, groups": dict(batch=2, dim=4, length=100, n=1, groups=2, b_layout="groups", scale=30.0),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the Triton interpreter: exp(90) = inf in σ(−90)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_scan_equals_the_sequential_definition(shape, backend):
    needs(backend)
    if backend == "triton" and shape["length"] > 200:  # grouped B/C: the bf16, low-rank and steep cases
        pytest.skip("the Triton interpreter is slow; the long cases run on the torch backend")
    inputs = make_inputs(**shape)
    assert_matches(values_and_grads(selective_scan, inputs, backend=backend),
                   values_and_grads(sequential_scan, inputs), ["y", *inputs])


OPTIONAL = ["D", "z", "delta_bias", "softplus"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("absent", [[name] for name in OPTIONAL] + [OPTIONAL], ids=[*OPTIONAL, "all"])
def test_each_optional_input_on_and_off(absent, backend):
    """D, the z gate, the Δ bias and softplus each left out (and all at once) — as mamba-ssm's interface allows."""
    needs(backend)
    inputs = make_inputs(batch=2, dim=8, length=40, n=4, scale=0.3)
    if "softplus" in absent:  # Δ is a step size: positive without softplus
        inputs["delta"] = inputs["delta"].abs()
    inputs = {k: v for k, v in inputs.items() if k not in absent}
    softplus = "softplus" not in absent
    assert_matches(values_and_grads(selective_scan, inputs, softplus, backend=backend),
                   values_and_grads(sequential_scan, inputs, softplus), ["y", *inputs])


LAYOUTS = {"B per batch, C fixed": ("batch", "fixed"), "B fixed, C per batch": ("fixed", "batch"),
           "both fixed": ("fixed", "fixed"), "strided views (as the models pass them)": ("strided", "strided"),
           "B strided, C contiguous": ("strided", "batch")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layouts", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_b_and_c_in_any_layout(layouts, backend):
    needs(backend)
    inputs = make_inputs(batch=2, dim=6, length=37, n=3, b_layout=layouts[0], c_layout=layouts[1], scale=0.2)
    assert_matches(values_and_grads(selective_scan, inputs, backend=backend),
                   values_and_grads(sequential_scan, inputs), ["y", *inputs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["grouped", "shared"])
def test_a_low_rank_delta_is_the_projection_it_stands_for(layout, backend):
    """delta_proj_weight: Δ = W·delta inside the scan (recomputed in backward), as if W·delta were passed."""
    needs(backend)
    g = torch.Generator().manual_seed(1)
    inputs = make_inputs(batch=2, dim=8, length=40, n=2, groups=4 if layout == "grouped" else None,
                         b_layout="groups" if layout == "grouped" else "batch", scale=0.3)
    low = torch.randn(2, 4, 3, 40, generator=g) if layout == "grouped" else torch.randn(2, 3, 40, generator=g)
    weight = torch.randn(4, 2, 3, generator=g) if layout == "grouped" else torch.randn(8, 3, generator=g)
    del inputs["delta"]
    inputs.update(delta=low, delta_proj_weight=weight)

    def projected_first(delta, delta_proj_weight, **rest):
        return sequential_scan(delta=torch.matmul(delta_proj_weight, delta).reshape(2, 8, 40), **rest)

    assert_matches(values_and_grads(selective_scan, inputs, backend=backend),
                   values_and_grads(projected_first, inputs), ["y", *inputs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["VMamba's grouped B/C", "MambaVision window 14²"])
def test_bf16_inputs_are_computed_in_fp32_and_rounded_once(shape, backend):
    """bf16 inputs: the scan runs in fp32 inside, so y and every gradient are the definition in fp32 on the same
    (bf16) values, rounded once to bf16: within 2⁻⁸ (one bf16 ulp at the largest value) of it, relative to the
    largest magnitude. The state stays fp32."""
    needs(backend)
    assert_bf16_is_rounded_fp32(backend, {k: v.bfloat16() for k, v in
                                          make_inputs(**{**SHAPES[shape], "length": 60}).items()})


def assert_bf16_is_rounded_fp32(backend: str, inputs: dict) -> None:
    ours = values_and_grads(selective_scan, inputs, backend=backend)
    reference = values_and_grads(sequential_scan, {k: v.float() for k, v in inputs.items()})
    assert [t.dtype for t in ours] == [torch.bfloat16] * (len(ours) - 1) + [torch.float32]
    for name, a, b in zip(["y", *inputs, "last state"], ours, reference, strict=True):
        error = float((a.float() - b).abs().max() / b.abs().max())
        assert error <= 2 ** -8, f"{name}: relative error {error:.1e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_last_state_is_its_own_tensor(backend):
    """return_last_state: h_L (its values are checked against the definition with every case above), a tensor of
    its own — not a view that keeps the scan's whole state buffer alive."""
    needs(backend)
    inputs = make_inputs(batch=2, dim=3, length=20, n=4)
    y, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
    assert state.shape == (2, 3, 4) and state.dtype == torch.float32
    assert state._base is None and state.untyped_storage().nbytes() == state.numel() * 4


@pytest.mark.parametrize("b_groups, c_groups, dim", [(2, 4, 8), (4, 1, 8), (3, 3, 8)])
def test_b_and_c_must_serve_the_same_groups_of_channels(b_groups, c_groups, dim):
    """mamba-ssm's rule, refused before any kernel runs: the Triton kernel would read B past its end."""
    def projection(groups):
        return torch.randn(2, 4, 10) if groups == 1 else torch.randn(2, groups, 4, 10)

    inputs = dict(u=torch.randn(2, dim, 10), delta=torch.randn(2, dim, 10), A=-torch.rand(dim, 4),
                  B=projection(b_groups), C=projection(c_groups))
    match = "different group counts" if b_groups != c_groups else "do not split dim 8"
    for backend in ("torch", "triton", "auto"):
        with pytest.raises(ValueError, match=match):
            selective_scan(**inputs, backend=backend)


def test_decays_that_underflow_are_exact_and_finite():
    """|ΔA| up to ~1e4: e^{ΔA} is 0 in fp32, where an e^{−cumsum} form would overflow in any chunk."""
    inputs = make_inputs(batch=2, dim=4, length=400, n=16, scale=1.0)
    inputs["A"] = -torch.full((4, 16), 1e4)
    y, *grads = values_and_grads(selective_scan, inputs, backend="torch")
    assert all(torch.isfinite(t).all() for t in [y, *grads])
    assert_matches([y, *grads], values_and_grads(sequential_scan, inputs), ["y", *inputs])


def test_gradients_come_in_each_input_s_dtype():
    half = {k: v.bfloat16() for k, v in make_inputs(batch=2, dim=3, length=20, n=4).items()}
    leaves = {k: v.requires_grad_() for k, v in half.items()}
    y = selective_scan(**leaves, delta_softplus=True, backend="torch")
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(leaf.grad.dtype == torch.bfloat16 for leaf in leaves.values())


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


def test_the_torch_backend_compiles_whole_under_torch_compile():
    """Inductor (C++ on this CPU) takes the whole scan, forward and backward, as one graph (fullgraph=True: no
    graph break) and matches the definition: the compiled torch backend is ready to be timed against the Triton
    kernel on a GPU (scripts/bench_scan.py --device cuda)."""
    torch._dynamo.reset()
    inputs = make_inputs(batch=2, dim=8, length=40, n=3, groups=4, b_layout="groups", scale=0.3)
    compiled = torch.compile(lambda **kw: selective_scan(**kw, backend="torch"), fullgraph=True, dynamic=False)
    assert_matches(values_and_grads(compiled, inputs), values_and_grads(sequential_scan, inputs), ["y", *inputs])
