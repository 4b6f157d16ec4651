"""Heads: the linear classifier, and BYOL's projector / predictor MLPs (Grill et al. 2020, §3.3)."""

from __future__ import annotations

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
