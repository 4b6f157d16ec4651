"""Our MambaVision and VMamba as timm models: sizes, shapes, official key layouts, weights, fine-tuning."""

import pytest
import timm
import torch

from tune_xray.config import ConfigError
from tune_xray.models import create_backbone, load_pretrained, param_count
from tune_xray.phases import run_phases

# millions of parameters at 1000 classes: MambaVision paper Table 1; VMamba's release table (v2 checkpoints)
PUBLISHED = {"mambavision_t": 31.8, "mambavision_t2": 35.1, "mambavision_s": 50.1, "mambavision_b": 97.7,
             "mambavision_l": 227.9, "mambavision_l2": 241.5, "vmamba_t": 30, "vmamba_s": 50, "vmamba_b": 89}
TINY = ["test_mambavision", "test_vmamba"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_size_builds_with_the_published_parameter_count(name):
    with torch.device("meta"):  # counts shapes, allocates nothing
        model = timm.create_model(name)
    assert param_count(model) / 1e6 == pytest.approx(PUBLISHED[name], rel=0.02)
    with torch.device("meta"):
        backbone, width = create_backbone(name, in_chans=1)
    assert width == backbone.num_features and backbone.num_classes == 0


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_tiny_variants_train_at_64px(name, in_chans):
    torch.manual_seed(0)
    model, width = create_backbone(name, in_chans=in_chans)
    x = torch.randn(2, in_chans, 64, 64)
    features = model(x)
    assert features.shape == (2, width) and torch.isfinite(features).all()
    features.square().mean().backward()
    scan_names = ("A_log", "A_logs", "dt_proj.bias", "dt_projs_bias")
    scan_params = [p for n, p in model.named_parameters() if n.endswith(scan_names)]
    assert scan_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scan_params)
    feature_map = model.forward_features(x)  # (B, C, H/32, W/32): what Grad-CAM hooks onto
    assert feature_map.shape == (2, width, 2, 2)


def test_odd_sizes_are_padded_to_whole_windows():
    model, width = create_backbone("test_mambavision")
    assert model(torch.randn(1, 3, 72, 88)).shape == (1, width)


# names and shapes from the official releases' modules (NVlabs/MambaVision, MzeroMiko/VMamba v2)
OFFICIAL_KEYS = {
    "mambavision_t": {"patch_embed.conv_down.0.weight": (32, 3, 3, 3), "levels.0.blocks.0.conv1.weight": (80, 80, 3, 3),
                      "levels.0.downsample.reduction.0.weight": (160, 80, 3, 3),
                      "levels.2.blocks.0.mixer.A_log": (160, 8), "levels.2.blocks.0.mixer.x_proj.weight": (36, 160),
                      "levels.2.blocks.0.mixer.conv1d_x.weight": (160, 1, 3),
                      "levels.2.blocks.7.mixer.qkv.weight": (960, 320), "levels.3.blocks.3.mlp.fc2.weight": (640, 2560),
                      "norm.running_var": (640,), "head.weight": (1000, 640)},
    "vmamba_t": {"patch_embed.0.weight": (48, 3, 3, 3), "patch_embed.7.weight": (96,),
                 "layers.0.blocks.0.op.in_proj.weight": (96, 96), "layers.0.blocks.0.op.x_proj_weight": (4, 8, 96),
                 "layers.0.blocks.0.op.dt_projs_weight": (4, 96, 6), "layers.0.blocks.0.op.A_logs": (384, 1),
                 "layers.0.blocks.0.op.out_norm.weight": (96,), "layers.0.downsample.1.weight": (192, 96, 3, 3),
                 "layers.0.downsample.3.weight": (192,), "layers.3.blocks.1.mlp.fc1.weight": (3072, 768),
                 "classifier.norm.weight": (768,), "classifier.head.weight": (1000, 768)},
}


@pytest.mark.parametrize("name", OFFICIAL_KEYS)
def test_parameter_names_follow_the_official_checkpoints(name):
    with torch.device("meta"):
        state = timm.create_model(name).state_dict()
    assert {k: tuple(state[k].shape) for k in OFFICIAL_KEYS[name] if k in state} == OFFICIAL_KEYS[name]
    assert not any("gamma" in k for k in state) if name == "mambavision_t" else True  # layer scale only B/L/L2


@pytest.mark.parametrize("name", TINY)
def test_official_style_checkpoint_loads_and_reproduces_outputs(name, tmp_path):
    source = timm.create_model(name, num_classes=5).eval()
    # as released: MambaVision's .pth.tar under 'state_dict', VMamba's .pth under 'model', HF exports under 'model.'
    torch.save({"state_dict": source.state_dict(), "epoch": 300}, tmp_path / "release.pth.tar")
    torch.save({"model": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "export.pth")
    x = torch.randn(2, 3, 64, 64)
    for path in (tmp_path / "release.pth.tar", tmp_path / "export.pth"):
        model, _ = create_backbone(name, pretrained=path)
        assert torch.allclose(model.eval()(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    torch.save(timm.create_model("test_vmamba").state_dict(), tmp_path / "vmamba.pth")
    model = timm.create_model("test_mambavision", num_classes=0)
    with pytest.raises(ValueError, match="vmamba.pth: does not fit backbone 'test_mambavision'"):
        load_pretrained(model, tmp_path / "vmamba.pth", in_chans=3)


def test_fine_tune_phase_runs_with_a_tiny_mambavision(make_config, tmp_path):
    cfg = make_config(model={"backbone": "test_mambavision", "in_chans": 1}, supervised={"epochs": 1})
    summary = run_phases(cfg, tmp_path / "run")
    assert 0 <= summary["val"]["mean_auroc"] <= 1
    # the backend that ran is in the summary and in the config written beside it (auto resolved on the CPU)
    assert summary["scan_backend"] == "torch"
    assert "scan_backend: torch" in (tmp_path / "run" / "config.yaml").read_text()


def _kept_for_backward(model, loss_of) -> tuple[int, torch.Tensor]:
    """Bytes of activations autograd keeps for backward while `loss_of()` runs (each storage once, the model's
    weights not counted), and the loss."""
    kept, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of()
    return sum(kept.values()), loss


@pytest.mark.parametrize("name, at_most", [("test_mambavision", 0.5), ("test_vmamba", 0.5),
                                           ("test_resnet", 0.9)])  # timm's ResNet checkpoints whole stages
def test_gradient_checkpointing_keeps_less_and_changes_no_gradient(name, at_most):
    torch.manual_seed(0)
    plain, _ = create_backbone(name)
    checkpointed, _ = create_backbone(name, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 64, 64)
    kept, grads = [], []
    for model in (plain, checkpointed):
        size, loss = _kept_for_backward(model, lambda: model(x).square().mean())
        loss.backward()
        kept.append(size)
        grads.append([p.grad for p in model.parameters()])
    assert kept[1] < at_most * kept[0]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_a_backbone_without_gradient_checkpointing_is_a_config_error():
    with torch.device("meta"), pytest.raises(ConfigError, match="model.grad_checkpointing: model.backbone 'vgg11' "
                                                                "does not support gradient checkpointing"):
        create_backbone("vgg11", grad_checkpointing=True)


@pytest.mark.parametrize("name, kept", [("test_mambavision", ("A_log", "D")), ("test_vmamba", ("A_logs", "Ds"))])
def test_ssm_parameters_are_kept_out_of_weight_decay_however_wrapped(name, kept):
    """timm's create_optimizer_v2 reads no_weight_decay() (full names) on the module it is given: the bare
    backbone, the fine-tuned Classifier and BYOL's online modules must all name A_log / D (the papers' code)."""
    from tune_xray.config import OptimizerConfig
    from tune_xray.models.heads import Classifier
    from tune_xray.phases.byol import Byol, OnlineModules
    from tune_xray.phases.common import build_optimizer

    backbone, width = create_backbone(name)
    byol = Byol(create_backbone(name)[0], width, 16, 8, 0.99)
    for module in (backbone, Classifier(backbone, width, 3), OnlineModules([byol.online, byol.predictor])):
        optimizer = build_optimizer(module, OptimizerConfig(name="adamw", weight_decay=0.05))
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        names = dict(module.named_parameters())
        ssm = [n for n in names if n.split(".")[-1] in kept]
        assert ssm and all(decay_of[id(names[n])] == 0 for n in ssm)
        assert any(decay_of[id(p)] == 0.05 for n, p in names.items() if n.endswith("weight") and p.ndim > 1)
