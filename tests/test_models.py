import pytest
import timm
import torch
from safetensors.torch import save_file

from tune_xray.models import WeightsError, create_backbone, load_pretrained

# Every timm backbone named by the seed studies S0–S4.
SEED_BACKBONES = ["densenet121", "convnextv2_large", "swinv2_cr_small_ns_224", "coatnet_2_rw_224",
                  "maxxvitv2_rmlp_base_rw_224", "resnet18", "resnet34", "resnet50", "efficientnet_b1",
                  "efficientnetv2_s", "mobilenetv3_large_100", "vit_base_patch16_384"]


@pytest.mark.parametrize("name", SEED_BACKBONES)
def test_seed_backbones_build_as_feature_extractors(name):
    with torch.device("meta"):  # no memory, no weights: only that timm builds it with num_classes=0
        model, width = create_backbone(name, in_chans=1)
    assert width == model.num_features > 0
    assert getattr(model, "num_classes", 0) == 0


@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_features(in_chans):
    model, width = create_backbone("test_resnet", in_chans=in_chans)
    assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, width)


def test_local_weights_round_trip_and_first_conv_adapted(tmp_path):
    src = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), path)
    model, _ = create_backbone("test_resnet", pretrained=path, in_chans=1)
    assert torch.equal(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert model.conv1[0].weight.shape[1] == 1
    assert torch.allclose(model.conv1[0].weight[:, 0], src.conv1[0].weight.sum(1))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    again, _ = create_backbone("test_resnet", pretrained=tmp_path / "w.pth", in_chans=3)
    assert torch.equal(again.conv1[0].weight, src.conv1[0].weight)


def test_mismatched_or_missing_weights_are_clear_errors(tmp_path):
    other = timm.create_model("test_vit")
    save_file(other.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(WeightsError, match="vit.safetensors: does not fit backbone 'test_resnet'"):
        create_backbone("test_resnet", pretrained=tmp_path / "vit.safetensors")
    with pytest.raises(WeightsError, match="nope.pth: pretrained weights file not found"):
        load_pretrained(timm.create_model("test_resnet", num_classes=0), tmp_path / "nope.pth", 3)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown timm model 'resnet19'"):
        create_backbone("resnet19")
