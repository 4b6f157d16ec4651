"""Heads: the linear classifier, and BYOL's projector / predictor MLPs (Grill et al. 2020, §3.3); how several
predictions of one image are averaged; which parameters stay out of weight decay once a backbone is wrapped."""

from __future__ import annotations

from typing import Sequence

import torch
from timm.models import group_parameters
from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear–BN–ReLU–Linear: BYOL's projector (feat → H → 256) and predictor (256 → H → 256); S0: H 1024."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def nested_no_weight_decay(root: nn.Module) -> set[str]:
    """Full names (from `root`) of the parameters kept out of weight decay: those flagged `_no_weight_decay`
    (the SSM A_log / D of MambaVision and VMamba, as in their papers' code) and every timm submodule's own
    `no_weight_decay()` list (ViT's pos_embed, cls_token, ...). timm's `create_optimizer_v2` reads a model's
    `no_weight_decay()`, but only on the module it is given: wrappers return this."""
    names = {name for name, p in root.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for prefix, module in root.named_modules():
        if module is not root and hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
    return names


def mean_probability_logits(logits: Sequence[torch.Tensor], multilabel: bool) -> torch.Tensor:
    """Logits whose sigmoid (multi-label) or softmax (multi-class) is the mean of the inputs' probabilities.

    Averaging probabilities, not logits, is the ensemble rule (S0's ensemble; TTA views and CASS members
    alike): downstream code keeps applying sigmoid/softmax and gets the mean probability."""
    if multilabel:
        return torch.logit(torch.stack([t.float().sigmoid() for t in logits]).mean(0), eps=1e-7)
    return torch.stack([t.float().softmax(1) for t in logits]).mean(0).clamp_min(1e-12).log()


class Classifier(nn.Module):
    """Backbone features → dropout → linear logits."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(num_features, num_classes))

    def forward(self, x):
        return self.head(self.backbone(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return nested_no_weight_decay(self)


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
        return mean_probability_logits(logits, self.multilabel)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return nested_no_weight_decay(self)


def freeze_backbone(backbone: nn.Module, freeze: float | str) -> int:
    """Freeze the first ⌊freeze·G⌋ of the backbone's G parameter groups in depth order, or all of them
    ('head_only'); returns how many parameter tensors were frozen. Groups are timm's `group_matcher`
    (stem, then each stage) where the model has one, its top-level children otherwise (S3: 0, 50 %, 75 %)."""
    if hasattr(backbone, "group_matcher"):
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
        groups = [names for _, names in sorted(grouped.items())]
    else:
        groups = [[f"{child}.{name}" for name, _ in module.named_parameters()]
                  for child, module in backbone.named_children()]
        groups = [g for g in groups if g]
    n = len(groups) if freeze == "head_only" else int(float(freeze) * len(groups))
    frozen = {name for group in groups[:n] for name in group}
    for name, param in backbone.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return len(frozen)
