"""Deterministic stand-in weights used when no checkpoint is staged.

The recipe is fixed by ``shared/specs/README.md``: every floating-point tensor of the state_dict
is drawn from a generator seeded with ``crc32(f"{salt}:{name}")``, so values depend only on key
names and shapes. The upstream goldens were computed under this init with ``salt="public"``.
"""
from __future__ import annotations

import hashlib
import math
import zlib

import torch

DEFAULT_SALT = "public"


def seeded_tensor(name: str, shape: torch.Size, salt: str = DEFAULT_SALT) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{name}".encode()))
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if len(shape) <= 1:
        offset = 1.0 if name.endswith("weight") else 0.0
        return 0.1 * torch.randn(shape, generator=g) + offset
    fan = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan)


@torch.no_grad()
def apply_seeded_weights(model: torch.nn.Module, salt: str = DEFAULT_SALT) -> torch.nn.Module:
    """Overwrite every floating-point state tensor of ``model`` in place and switch it to eval()."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        tensor.copy_(seeded_tensor(name, tensor.shape, salt).to(tensor.dtype))
    return model.eval()


def seeded_digest(model: torch.nn.Module, salt: str = DEFAULT_SALT) -> str:
    """Identity of seeded weights for cache keys: the salt plus the key/shape layout they depend on."""
    layout = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
    return f"seeded-{salt}-" + hashlib.sha256(layout.encode()).hexdigest()[:16]
