"""DEKR's pose rescoring MLP (upstream PredictOKSNet), keys as ``state_dict_rescore.tsv``.

It predicts an OKS-like quality from 74 pose features (spec §e.10); the final detection score is
its output times the pose score. It runs in PyTorch on the host, not in the exported network.
"""
from __future__ import annotations

import torch
from torch import nn

RESCORE_FEATURES = 74
RESCORE_HIDDEN = 256


class RescoreNet(nn.Module):
    def __init__(self, in_features: int = RESCORE_FEATURES, hidden: int = RESCORE_HIDDEN) -> None:
        super().__init__()
        self.l1 = nn.Linear(in_features, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, 1)
        self.relu = nn.ReLU()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(P, 74) -> (P, 1)."""
        return self.l3(self.relu(self.l2(self.relu(self.l1(feature)))))


def build_rescore() -> RescoreNet:
    """Randomly initialised net in eval mode; load a checkpoint or apply seeded weights next."""
    return RescoreNet().eval()
