"""FOMM's calibrated agreement networks do what calibrate.py says of them (the agreement-set
metrics themselves are checked in tests/models/test_agreement_sets.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tooling.models.fomm.calibrate import CARRIED, OCCLUSION_LOGIT, appearance_generator, keypoint_detector


@torch.no_grad()
def test_appearance_path_carries_red_and_green_to_the_readout():
    """With driving = source keypoints the warp is the identity: ``final`` reads the source's
    carried channels, 4x average-pooled and nearest-upsampled, times the constant occlusion."""
    torch.manual_seed(0)
    source = torch.rand(1, 3, 128, 128)
    keypoints = keypoint_detector()(source)
    torch.testing.assert_close(keypoints["jacobian"], torch.eye(2).expand(1, 10, 2, 2), atol=1e-6, rtol=0)  # softmax-weighted bias
    generator = appearance_generator()
    seen = []
    generator.final.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    generator(source, keypoints["value"], keypoints["jacobian"], keypoints["value"], keypoints["jacobian"])
    carried = seen[0][:, list(CARRIED)]
    expected = F.interpolate(F.avg_pool2d(source[:, list(CARRIED)], 4), scale_factor=4.0) * torch.sigmoid(
        torch.tensor(OCCLUSION_LOGIT))
    # rtol: the pass-through batch norms' variance (1 - eps) is 1 in the half-precision checkpoint
    np.testing.assert_allclose(carried.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
    assert not seen[0][:, len(CARRIED):].any(), "channels past the carried ones must stay zero"
