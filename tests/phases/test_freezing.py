"""Freezing by parameter group (S3) and S0's two-stage fine-tune (head warm-up, then all weights)."""

import copy

import pytest
import torch

from tune_xray.config import SupervisedConfig
from tune_xray.models import create_backbone
from tune_xray.models.heads import Classifier, freeze_backbone
from tune_xray.phases import run_phases
from tune_xray.phases.supervised import head_only, warm_up_head


@pytest.mark.parametrize("freeze, frozen_prefixes", [
    (0.5, ("conv1", "bn1", "layer1")),                    # resnet18's groups: stem, layer1..4 → 2 of 5
    (0.75, ("conv1", "bn1", "layer1", "layer2")),          # ⌊0.75·5⌋ = 3
    ("head_only", ("",)),
])
def test_freeze_fraction_freezes_the_first_groups_in_depth_order(freeze, frozen_prefixes):
    with torch.device("meta"):
        backbone, _ = create_backbone("resnet18")
    freeze_backbone(backbone, freeze)
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name


def test_our_ssm_backbones_group_by_stage():
    backbone, _ = create_backbone("test_mambavision")
    freeze_backbone(backbone, 0.5)  # 5 groups: stem, levels 0–3 → stem and level 0
    frozen = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("levels") else "")
              for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed", "levels.0"}


def test_head_warm_up_trains_only_the_head_and_restores_trainability():
    backbone, width = create_backbone("test_resnet")
    model = Classifier(backbone, width, 3)
    freeze_backbone(model.backbone, 0.5)
    trainable = [p.requires_grad for p in model.backbone.parameters()]
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(4, 3, 32, 32), torch.rand(4, 3).round()) for _ in range(3)]
    loss = torch.nn.BCEWithLogitsLoss()
    with head_only(model):
        warm_up_head(model, _Loader(batches), lambda b: loss(model(b[0]), b[1]), SupervisedConfig(head_warmup_epochs=2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.") and "running" not in k
               and "num_batches" not in k)
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert [p.requires_grad for p in model.backbone.parameters()] == trainable


class _Loader(list):
    """A fixed list of batches with the sampler hook `set_epoch` looks for."""

    class _Sampler:
        def set_epoch(self, epoch):
            pass

    sampler = type("S", (), {"sampler": _Sampler()})()


def test_two_stage_frozen_fine_tune_runs(make_config, tmp_path):
    cfg = make_config(supervised={"epochs": 1, "freeze": 0.5, "head_warmup_epochs": 1})
    summary = run_phases(cfg, tmp_path / "run")
    assert summary["supervised"]["best_epoch"] == 1


def test_freeze_share_is_validated():
    with pytest.raises(ValueError, match="freeze must be a share in \\[0, 1\\) or head_only"):
        SupervisedConfig(freeze=1.5)
