"""Focal loss, class-weight schemes and majority undersampling (issue 5; S1's reversed weights)."""

import numpy as np
import pytest
import torch
from torch import nn

from tune_xray.config import SupervisedConfig
from tune_xray.phases.supervised import FocalLoss, class_weights, make_loss, undersample_majority

g = torch.Generator().manual_seed(0)
LOGITS_ML, TARGET_ML = torch.randn(16, 5, generator=g), (torch.rand(16, 5, generator=g) > 0.7).float()
LOGITS_MC, TARGET_MC = torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)


def test_focal_at_gamma_0_alpha_1_is_bce_and_ce():
    pos_weight, weight = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0]), torch.tensor([0.5, 1.0, 2.0, 4.0])
    assert torch.allclose(FocalLoss("multilabel", 1.0, 0.0)(LOGITS_ML, TARGET_ML),
                          nn.BCEWithLogitsLoss()(LOGITS_ML, TARGET_ML))
    assert torch.allclose(FocalLoss("multilabel", 1.0, 0.0, pos_weight=pos_weight)(LOGITS_ML, TARGET_ML),
                          nn.BCEWithLogitsLoss(pos_weight=pos_weight)(LOGITS_ML, TARGET_ML))
    assert torch.allclose(FocalLoss("multiclass", 1.0, 0.0, weight=weight)(LOGITS_MC, TARGET_MC),
                          nn.CrossEntropyLoss(weight=weight)(LOGITS_MC, TARGET_MC))


def test_focal_down_weights_easy_examples():
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[0.0]])  # p = 0.98 and 0.5 for a positive
    ratio = lambda loss: float(loss(easy, torch.ones(1, 1)) / loss(hard, torch.ones(1, 1)))  # noqa: E731
    assert ratio(FocalLoss("multilabel", 1.0, 2.0)) < ratio(nn.BCEWithLogitsLoss()) / 100
    assert float(FocalLoss("multilabel", 0.25, 0.0)(hard, torch.ones(1, 1))) == pytest.approx(0.25 * np.log(2))


def test_class_weight_schemes():
    targets = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert class_weights(targets, 4, "inverse").tolist() == pytest.approx([10 / 24, 10 / 12, 10 / 4, 0.0])
    assert class_weights(targets, 4, "s1_count").tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0])  # majority most
    assert class_weights(targets, 4, "none") is None
    loss = make_loss("multiclass", SupervisedConfig(), targets, 4)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.weight[2] > loss.weight[1] > loss.weight[0]
    focal = make_loss("multilabel", SupervisedConfig(loss="focal", pos_weight=True), TARGET_ML.numpy(), 5)
    assert isinstance(focal, FocalLoss) and focal.pos_weight is not None


def test_undersampling_cuts_the_majority_to_the_runner_up():
    targets = np.array([0] * 50 + [1] * 12 + [2] * 5)
    keep = undersample_majority(targets, seed=0)
    assert np.bincount(targets[keep]).tolist() == [12, 12, 5]
    assert np.array_equal(keep, undersample_majority(targets, seed=0))  # seeded
    assert not np.array_equal(keep, undersample_majority(targets, seed=1))


def _masked(target: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`target` with about a third of its entries NaN (ignored: U-Ignore / data.missing: ignore), and the mask."""
    known = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed)) > 0.35
    return torch.where(known, target, torch.full_like(target, float("nan"))), known


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_the_masked_loss_is_bce_on_the_labelled_entries_and_ignores_the_rest(loss):
    target, known = _masked(TARGET_ML)
    pos_weight = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0])
    cfg = SupervisedConfig(loss=loss, pos_weight=False, focal_alpha=1.0, focal_gamma=0.0)
    fn = make_loss("multilabel", cfg, target.numpy(), 5)
    logits = LOGITS_ML.clone().requires_grad_(True)
    value = fn(logits, target)
    expected = nn.BCEWithLogitsLoss()(LOGITS_ML[known], TARGET_ML[known])
    assert torch.allclose(value, expected)
    value.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()  # masked entries: no gradient
    weighted = FocalLoss("multilabel", 1.0, 0.0, pos_weight=pos_weight)(LOGITS_ML, target)
    per_entry = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")(LOGITS_ML, TARGET_ML)
    assert torch.allclose(weighted, per_entry[known].mean())


def test_pos_weight_counts_only_labelled_entries():
    target, known = _masked(TARGET_ML)
    fn = make_loss("multilabel", SupervisedConfig(loss="bce", pos_weight=True), target.numpy(), 5)
    pos = ((TARGET_ML == 1) & known).sum(0).float()
    neg = ((TARGET_ML == 0) & known).sum(0).float()
    assert torch.allclose(fn.pos_weight, torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones(5)))
