"""Heads: the linear classifier, and BYOL's projector / predictor MLPs (Grill et al. 2020, §3.3)."""

from __future__ import annotations

import torch
from timm.models import group_parameters
from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear–BN–ReLU–Linear: BYOL's projector (feat → H → 256) and predictor (256 → H → 256); S0: H 1024."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class Classifier(nn.Module):
    """Backbone features → dropout → linear logits."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(num_features, num_classes))

    def forward(self, x):
        return self.head(self.backbone(x))


class MemberEnsemble(nn.Module):
    """Classifiers fine-tuned side by side (both CASS arms), each with its own head and its own loss.

    Training: the members' logits come stacked along the batch (the loss repeats the targets), so no member
    leans on the other. Eval: the logit of the members' mean probability (sigmoid for multi-label, log for
    softmax), so the usual sigmoid/softmax of the output is exactly the ensemble's mean probability (S0's
    ensemble rule)."""

    def __init__(self, members: list[Classifier], multilabel: bool):
        super().__init__()
        self.members, self.multilabel = nn.ModuleList(members), multilabel

    @property
    def backbone(self) -> nn.ModuleList:  # views for freezing and the head warm-up, not extra parameters
        return nn.ModuleList(m.backbone for m in self.members)

    @property
    def head(self) -> nn.ModuleList:
        return nn.ModuleList(m.head for m in self.members)

    def forward(self, x):
        logits = [m(x) for m in self.members]
        if self.training:
            return torch.cat(logits)
        if self.multilabel:
            return torch.logit(torch.stack([t.float().sigmoid() for t in logits]).mean(0), eps=1e-7)
        return torch.stack([t.float().softmax(1) for t in logits]).mean(0).clamp_min(1e-12).log()


def freeze_backbone(backbone: nn.Module, freeze: float | str) -> int:
    """Freeze the first ⌊freeze·G⌋ of the backbone's G parameter groups in depth order, or all of them
    ('head_only'); returns how many parameter tensors were frozen. Groups are timm's `group_matcher`
    (stem, then each stage) where the model has one, its top-level children otherwise (S3: 0, 50 %, 75 %)."""
    if hasattr(backbone, "group_matcher"):
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
        groups = [names for _, names in sorted(grouped.items())]
    else:
        groups = [[f"{child}.{name}" for name, _ in module.named_parameters()] for child, module in backbone.named_children()]
        groups = [g for g in groups if g]
    n = len(groups) if freeze == "head_only" else int(float(freeze) * len(groups))
    frozen = {name for group in groups[:n] for name in group}
    for name, param in backbone.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return len(frozen)
