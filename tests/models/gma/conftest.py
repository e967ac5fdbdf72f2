"""Shared GMA test fixtures: the public seeded state, loadable into either sampler variant."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from tooling.models.gma import build_gma
from tooling.seeded import apply_seeded_weights

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "gma"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="session")
def seeded_gma() -> Callable[..., torch.nn.Module]:
    """``seeded_gma(sampler, iters=6)``: the network with the public seeded weights, in eval mode."""
    state = apply_seeded_weights(build_gma()).state_dict()

    def build(sampler: str = "grid_sample", iters: int = 6) -> torch.nn.Module:
        model = build_gma(sampler, iters)
        model.load_state_dict(state, strict=True)
        return model.eval()

    build.state = state
    return build
