"""Checkpoint loading: strict, through the slice's key adapter, with errors that name file and keys."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from tooling.cache import file_sha256
from tooling.seeded import DEFAULT_SALT, apply_seeded_weights, seeded_digest


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the network."""


@dataclass(frozen=True)
class WeightsChoice:
    """Either a checkpoint file or the seeded stand-in, with a digest that identifies the values."""

    path: Path | None
    salt: str = DEFAULT_SALT

    @property
    def label(self) -> str:
        return str(self.path) if self.path else f"seeded({self.salt})"


def read_checkpoint(path: Path) -> object:
    """Unpickle a torch checkpoint; anything but a readable file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
        # Upstream training checkpoints pickle optimizer and RNG state; files under the weights
        # root are staged by the operator, so a full unpickle is acceptable there.
        warnings.warn(f"{path}: holds non-tensor objects; loading with weights_only=False", stacklevel=2)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # noqa: BLE001 - every failure means the same to the user
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({inner})") from inner
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def extract_state_dict(obj: object, path: Path, state_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Find the state_dict inside a checkpoint: the object itself or one of the named entries."""
    state_keys = list(state_keys)
    if isinstance(obj, dict):
        for key in state_keys:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    hint = f" (looked for entries {state_keys})" if state_keys else ""
    top = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no state_dict of tensors found{hint}; top level holds {top}")


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error naming them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_preview(mismatched)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _preview(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def apply_weights(model: torch.nn.Module, choice: WeightsChoice, slice_, network: str, state_keys) -> str:
    """Load ``choice`` into ``model`` (in eval mode) and return the digest that identifies the values."""
    if choice.path is None:
        apply_seeded_weights(model, choice.salt)
        return seeded_digest(model, choice.salt)
    raw = read_checkpoint(choice.path)
    state = slice_.adapt_state_dict(network, extract_state_dict(raw, choice.path, state_keys))
    load_strict(model, state, choice.path)
    model.eval()
    return "sha256-" + file_sha256(choice.path)[:32]
