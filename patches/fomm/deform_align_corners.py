"""The guide's warp numerics for first-order-model's generator (spec a, b).

The guide's patch makes the generator warp its encoded features and the source image with
``align_corners=True`` (what torch 1.0, which upstream pins, did by default) and leaves the
dense-motion network's sparse warps at torch >= 1.3's default ``False``. Both kinds of warp call
``F.grid_sample`` with no ``align_corners``, in two different modules, so this hook gives
``modules.generator`` alone a ``torch.nn.functional`` whose ``grid_sample`` defaults to True;
``modules.dense_motion`` keeps torch's own. The guide's other changes are export workarounds with
the same numbers (a closed-form 2x2 inverse, a gather-based bilinear sampler: the port's ``gather``
variant and its tests cover them), a dataset path, and an ``align_corners`` on the occlusion-map
resize that never runs for taichi (the map and the features are both 64 x 64).
"""
from __future__ import annotations

import functools
import types

import torch.nn.functional


def on_import(root, import_module) -> None:
    generator = import_module("modules.generator")
    functional = types.ModuleType("torch.nn.functional", "torch.nn.functional, warping with align_corners=True")
    functional.__dict__.update({k: v for k, v in vars(torch.nn.functional).items() if not k.startswith("__")})
    functional.grid_sample = functools.partial(torch.nn.functional.grid_sample, align_corners=True)
    generator.F = functional
