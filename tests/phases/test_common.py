import math

import pytest
import torch
from timm.optim import Lars
from torch import nn

from tune_xray.config import OptimizerConfig, SchedulerConfig
from tune_xray.phases.byol import ema_tau
from tune_xray.phases.common import build_optimizer, build_scheduler, run_epoch, step_scheduler


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("n_batches,accum", [(4, 4), (5, 2), (3, 3)])
def test_gradient_accumulation_equals_the_big_batch(n_batches, accum):
    x, y = torch.randn(n_batches * 4, 6), torch.randn(n_batches * 4, 3)
    big, small = _model(), _model()
    loss_fn = nn.MSELoss()
    # reference: one optimizer step per group on the concatenated group
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1)
    for start in range(0, n_batches, accum):
        rows = slice(start * 4, min(start + accum, n_batches) * 4)
        opt_big.zero_grad()
        loss_fn(big(x[rows]), y[rows]).backward()
        opt_big.step()
    opt_small = torch.optim.SGD(small.parameters(), lr=0.1)
    batches = [(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i in range(n_batches)]
    steps = []
    run_epoch(batches, lambda b: loss_fn(small(b[0]), b[1]), [opt_small], list(small.parameters()), accum,
              after_step=lambda: steps.append(1))
    assert len(steps) == math.ceil(n_batches / accum)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("read_every, named", [(2, "within the first 4 steps"), (32, "within the first 6 steps")])
def test_a_non_finite_loss_stops_the_epoch_at_the_next_read(read_every, named):
    """Losses are summed on the device and read every `read_every` steps and at the end, not at every step."""
    model, losses = _model(), [1.0, 2.0, float("nan"), 1.0, 1.0, 1.0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = iter(losses)
    with pytest.raises(FloatingPointError, match=named):
        run_epoch(range(6), lambda _: model(torch.ones(1, 6)).sum() * 0 + next(steps), [optimizer],
                  list(model.parameters()), read_every=read_every)
    assert run_epoch(range(4), lambda i: model(torch.ones(1, 6)).sum() * 0 + i, [optimizer],
                     list(model.parameters()), read_every=3) == pytest.approx(1.5)  # the mean of 0, 1, 2, 3


def test_deterministic_means_an_error_not_a_warning():
    from tune_xray.phases.common import seed_everything

    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_optimizers_build_through_timm():
    lars = build_optimizer(_model(), OptimizerConfig(name="lars", lr=0.2, weight_decay=1.5e-6, momentum=0.0))
    assert isinstance(lars, Lars)
    group = next(g for g in lars.param_groups if g["weight_decay"] > 0)
    assert (group["lr"], group["weight_decay"], group["momentum"], group["trust_coeff"]) == (0.2, 1.5e-6, 0.0, 0.001)
    assert any(g["weight_decay"] == 0 for g in lars.param_groups)  # biases excluded from decay
    adamw = build_optimizer(_model(), OptimizerConfig(name="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW)
    sgd = build_optimizer(_model(), OptimizerConfig(name="sgd", lr=0.06, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and not sgd.param_groups[0]["nesterov"]


def _lrs(cfg, epochs, metric=lambda e: 1.0):
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    sched = build_scheduler(opt, cfg, mode="min")
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        step_scheduler(sched, e + 1, {"val_loss": metric(e)}, cfg)
    return out


def test_every_scheduler():
    assert _lrs(SchedulerConfig(name="none"), 5) == [1.0] * 5
    step = _lrs(SchedulerConfig(name="step", step_size=2, gamma=0.5), 5)
    assert step == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    cos = _lrs(SchedulerConfig(name="cosine", t_max=10, eta_min=1e-6), 30)
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5, abs=1e-3)
    assert cos[10:] == pytest.approx([1e-6] * 20)  # stays at eta_min after T_max: no LR rise (S0 flaw 6)
    restarts = _lrs(SchedulerConfig(name="restarts", t_0=5, eta_min=0.0), 12)
    assert restarts[5] == restarts[10] == 1.0 and restarts[4] < 0.2
    warm = _lrs(SchedulerConfig(name="warmup_cosine", warmup_epochs=4, t_max=10, eta_min=1e-6), 20)
    assert warm[0] < 0.01 and warm[1] < warm[2] < warm[3] < warm[4] == pytest.approx(1.0)
    assert warm[14:] == pytest.approx([1e-6] * 6)
    plateau = _lrs(SchedulerConfig(name="plateau", gamma=0.1, patience=1, eta_min=0.0), 6)
    assert plateau[-1] < 0.1  # constant val loss → decays


def test_tau_schedule_goes_from_base_to_one():
    taus = [ema_tau(k, 100, 0.996) for k in range(101)]
    assert taus[0] == pytest.approx(0.996) and taus[-1] == 1.0
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_pos_weight_is_negatives_over_positives():
    import numpy as np

    from tune_xray.phases.supervised import positive_weights
    targets = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]], dtype=np.float32)
    assert positive_weights(targets).tolist() == pytest.approx([3.0, 1.0, 1 / 3])  # no positive: weight 1


@pytest.mark.parametrize("mode, device, bf16_supported, expected", [
    ("auto", "cpu", True, None), ("bf16", "cpu", True, None), ("off", "cuda", True, None),
    ("auto", "cuda", True, "bfloat16"), ("auto", "cuda", False, "float16"),
    ("bf16", "cuda", False, "bfloat16"), ("fp16", "cuda", True, "float16"),
])
def test_amp_mode_selection(monkeypatch, mode, device, bf16_supported, expected):
    from tune_xray.phases.common import amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    dtype = amp_dtype(mode, torch.device(device))
    assert dtype == (getattr(torch, expected) if expected else None)


def test_amp_config_values(make_config):
    from tune_xray.config import ConfigError, build_config
    from tune_xray.phases.common import Precision

    assert build_config({"amp": True}).amp == "auto" and build_config({"amp": False}).amp == "off"  # earlier files
    with pytest.raises(ConfigError, match="amp"):
        build_config({"amp": "fp32"})
    cpu = Precision(make_config(), torch.device("cpu"))  # fp32 and NCHW on CPU, whatever the config says
    assert cpu.dtype is None and not cpu.channels_last and not cpu.scaler().is_enabled()


def test_a_compiled_model_saves_the_plain_weights(make_config):
    from tune_xray.phases.common import compiled, unwrap

    model = nn.Linear(3, 2)
    assert compiled(model, make_config()) is model  # model.compile defaults to off
    wrapped = compiled(model, make_config(model={"backbone": "test_resnet", "compile": True}))
    assert wrapped is not model and unwrap(wrapped) is model  # torch.compile is lazy: nothing compiles here
    assert set(unwrap(wrapped).state_dict()) == {"weight", "bias"}
