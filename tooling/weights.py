"""Checkpoint loading: strict, through the slice's key adapter, with errors that name file and keys."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from tooling.fingerprint import file_digest
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


def verify_archive(path: Path) -> None:
    """Check every member of a zip-format checkpoint against its CRC-32: torch.load does not, so
    bytes flipped inside tensor data would otherwise load as different weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint archive ({exc})") from exc
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint: member {bad} fails its CRC-32 check")


def read_checkpoint(path: Path) -> object:
    """Unpickle a torch checkpoint; anything but a readable file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if zipfile.is_zipfile(path):
        verify_archive(path)
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
    except Exception as exc:  # noqa: BLE001 - text or fuzzed files escape as KeyError, IndexError, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


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
    # load_state_dict casts silently: integer data where a float parameter belongs is not weights.
    wrong_type = [
        f"{k}: checkpoint {state[k].dtype} vs network {expected[k].dtype}"
        for k in expected
        if k in state and state[k].is_floating_point() != expected[k].is_floating_point()
    ]
    nonfinite = [
        f"{k} ({int((~torch.isfinite(state[k])).sum())} of {state[k].numel()})"
        for k in expected
        if k in state and state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_preview(mismatched)}")
    if wrong_type:
        problems.append(f"{len(wrong_type)} dtype mismatches: {_preview(wrong_type)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensors hold NaN or Inf: {_preview(nonfinite)}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def known_layouts() -> dict[str, frozenset[str]]:
    """``<model>/<network>`` -> the state_dict keys of every network the suite knows, from the
    key lists under ``fixtures/<model>/state_dict_<network>.tsv`` (copied from the specs)."""
    from tooling.model_spec import FIXTURES_DIR

    layouts = {}
    for table in sorted(FIXTURES_DIR.glob("*/state_dict_*.tsv")):
        keys = {line.split("\t", 1)[0] for line in table.read_text().splitlines() if line.strip()} - {"key"}
        layouts[f"{table.parent.name}/{table.stem.removeprefix('state_dict_')}"] = frozenset(keys)
    return layouts


def other_network(state: dict[str, torch.Tensor], expected: set[str]) -> str | None:
    """The known network whose keys ``state`` holds (nearly all of them), when that is not the
    network expected (which shares few of them); None when the checkpoint is no known network's."""
    keys = {k.removeprefix("module.") for k in state}
    best = None
    for name, layout in known_layouts().items():
        share = len(keys & layout) / len(layout) if layout else 0.0
        if share >= 0.9 and len(layout & expected) < 0.5 * len(expected) and (best is None or share > best[0]):
            best = (share, name)
    return None if best is None else f"{best[1]} ({best[0]:.0%} of its keys)"


def _preview(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def apply_weights(model: torch.nn.Module, choice: WeightsChoice, slice_, network: str, state_keys) -> str:
    """Load ``choice`` into ``model`` (in eval mode) and return the digest that identifies the values."""
    if choice.path is None:
        apply_seeded_weights(model, choice.salt)
        return seeded_digest(model, choice.salt)
    raw = read_checkpoint(choice.path)
    found = extract_state_dict(raw, choice.path, state_keys)
    state = slice_.adapt_state_dict(network, found)
    try:
        load_strict(model, state, choice.path)
    except CheckpointError as exc:
        other = other_network(found, set(model.state_dict()))
        if other is None:
            raise
        raise CheckpointError(f"{choice.path}: a checkpoint of {other}, not of {network}: another model's "
                              f"checkpoint staged in {network}'s slot ({exc})") from None
    model.eval()
    return "sha256-" + file_digest(choice.path)[:32]
