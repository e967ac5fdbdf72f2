"""Shared DEKR test fixtures: one seeded state, loaded into any deformable-conv variant."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from tooling.models.dekr import build_hrnet_dekr
from tooling.seeded import apply_seeded_weights


@pytest.fixture(scope="session")
def seeded_dekr() -> Callable[[str], torch.nn.Module]:
    """``seeded_dekr(variant)``: the network with the public seeded weights, in eval mode."""
    state = apply_seeded_weights(build_hrnet_dekr()).state_dict()

    def build(variant: str) -> torch.nn.Module:
        model = build_hrnet_dekr(variant)
        model.load_state_dict(state, strict=True)
        return model.eval()

    build.state = state
    return build
