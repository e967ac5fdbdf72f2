"""The contract between the engine and one model's vertical slice.

A slice is a small package under ``tooling/models/<model>/`` that exposes ``SLICE``, an instance of
a ``ModelSlice`` subclass. It knows its networks, how checkpoints map onto them, how to turn raw
outputs into task results, and how to score a dataset. The engine supplies everything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from tooling.model_spec import ModelSpec
    from tooling.sources import UpstreamCheckout

Arrays = dict[str, np.ndarray]


@dataclass
class KnownAnswer:
    """A generated dataset plus the metric values an exact pipeline must report on it."""

    data_root: Path
    weights_root: Path
    expected: dict[str, float]
    tolerance: float
    profile: str  # the yaml profile whose dims the pipeline runs at
    # Per network, a stand-in computing ideal outputs from the feeds, for tasks where no weights
    # can make the real network exact (heatmap models); the rest of the pipeline runs unchanged.
    oracles: dict[str, Callable[[Mapping[str, np.ndarray]], Arrays]] = field(default_factory=dict)


@dataclass
class AccuracyContext:
    """What a slice's ``evaluate`` gets from the engine.

    ``run(network, feeds)`` executes the deployed artifact matching the feeds' shapes (built and
    cached on first use); ``progress(done, total, unit)`` reports how far the pass is;
    ``results`` stores per-sample records so an interrupted pass resumes instead of restarting;
    ``host_network(name)`` is a network with the staged weights in torch, for the parts a guide
    runs on the host rather than the accelerator (e.g. DEKR's rescoring net); ``run_host(name,
    feeds)`` runs such a network on arrays, or the known answer's oracle where one replaces it.
    """

    spec: "ModelSpec"
    data_paths: dict[str, Path]
    run: Callable[[str, Mapping[str, np.ndarray]], Arrays]
    progress: Callable[[int, int, str], None]
    results: Any
    host_network: Callable[[str], torch.nn.Module] | None = None
    limit: int | None = None
    scratch: Path | None = None
    dims: dict[str, int] = field(default_factory=dict)  # the profile's dims (e.g. padded sequence length)
    run_host: Callable[[str, Mapping[str, np.ndarray]], Arrays] | None = None


class ModelSlice:
    name: str = ""

    # -- networks -------------------------------------------------------------------------------
    def build_network(self, network: str, variant: str = "default") -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__} builds no network {network!r}")

    def adapt_state_dict(self, network: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint's state_dict onto the port's keys and layouts (default: drop ``module.``)."""
        return {key.replace("module.", "", 1) if key.startswith("module.") else key: v for key, v in state.items()}

    def export_extras(self, network: str, variant: str, exporter: str) -> dict[str, Any]:
        """Extra keyword arguments for ``torch.onnx.export`` (custom op translations and the like)."""
        return {}

    def example_inputs(self, spec: "ModelSpec", network: str, dims: dict[str, int], seed: int = 0) -> Arrays:
        """Inputs for parity and benchmarks; standard normal unless the slice needs realistic data."""
        rng = np.random.default_rng(seed)
        return {
            i.name: rng.standard_normal(i.concrete_shape(dims)).astype(i.dtype)
            for i in spec.networks[network].inputs
        }

    def golden_inputs(self, spec: "ModelSpec", network: str, path: Path, data: Mapping[str, np.ndarray]) -> Arrays:
        """A golden file's inputs: stored in it by default; a slice may rebuild large ones from a
        recipe. Missing inputs raise a KeyError naming the file."""
        names = spec.networks[network].input_names
        missing = [n for n in names if n not in data]
        if missing:
            raise KeyError(f"{path}: lacks input arrays {missing} (has {sorted(data)})")
        return {n: data[n] for n in names}

    def chain_inputs(self, spec: "ModelSpec", chain: str, dims: dict[str, int], seed: int = 0) -> Arrays:
        """Inputs of a chain (yaml ``chains.<name>.inputs``); standard normal unless overridden."""
        rng = np.random.default_rng(seed)
        return {i.name: rng.standard_normal(i.concrete_shape(dims)).astype(i.dtype) for i in spec.chains[chain].inputs}

    def run_chain(self, chain: str, run: Callable[[str, Mapping[str, np.ndarray]], Arrays],
                  feeds: Mapping[str, np.ndarray]) -> Arrays:
        """Run a yaml chain: ``run(network, feeds)`` executes one member network on the backend
        under test; the slice feeds each network from the previous ones' outputs."""
        raise NotImplementedError(f"{type(self).__name__} runs no chain {chain!r}")

    # -- task results ---------------------------------------------------------------------------
    def decode(self, network: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Arrays:
        """Turn raw network outputs into what the task reports (keypoints in pixels, poses in mm)."""
        raise NotImplementedError

    # -- upstream -------------------------------------------------------------------------------
    def build_upstream_network(self, network: str, checkout: "UpstreamCheckout") -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__} cannot build {network!r} from upstream code")

    # -- accuracy -------------------------------------------------------------------------------
    def evaluate(self, ctx: AccuracyContext) -> dict[str, float]:
        raise NotImplementedError

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """Write a small synthetic dataset and checkpoints under ``root`` with a computable answer."""
        raise NotImplementedError
