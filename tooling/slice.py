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


@dataclass(frozen=True)
class PassSample:
    """One unit of an accuracy pass: scored in one go and kept as one resumable record.

    ``id`` keys the record (unique in the pass, stable across runs and shards); ``item`` is what
    ``score_sample`` needs (a frame pair, a clip, a batch of crops); ``units`` is how much of the
    slice's ``accuracy_unit`` it holds (a clip's frames), for progress and for balancing shards.
    """

    id: str
    item: Any = None
    units: int = 1


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
    # sample id -> its figures (ModelSlice.sample_figures), filled as samples are scored or resumed
    sample_figures: dict[str, dict[str, float]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # what a slice opens once per pass (a dataset)

    def once(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``name`` is asked for in this pass, the same object after."""
        if name not in self.state:
            self.state[name] = make()
        return self.state[name]


class ModelSlice:
    name: str = ""
    # Networks that are the same graph in every export variant: name -> builder. A slice whose
    # networks change with the variant overrides build_network instead.
    builders: Mapping[str, Callable[[], torch.nn.Module]] = {}

    # -- networks -------------------------------------------------------------------------------
    def build_network(self, network: str, variant: str = "default") -> torch.nn.Module:
        if network not in self.builders:
            raise KeyError(f"{self.name} has no network {network!r}")
        return self.builders[network]()

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
    # A dataset pass is a list of samples, each scored into a record on its own, and a merge of
    # the records, in sample order, into the figures. The engine can then resume a pass sample
    # by sample and split it into shards that different devices or hosts score at once: merging
    # every shard's records gives the unsharded figures bit for bit, because the merge sees the
    # same records in the same order.
    accuracy_unit = "samples"  # what PassSample.units count, in progress lines

    def accuracy_samples(self, ctx: AccuracyContext) -> list[PassSample]:
        """The pass's samples in merge order (the first ``ctx.limit`` where the slice limits)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its pass into samples")

    def score_sample(self, ctx: AccuracyContext, sample: PassSample,
                     advance: Callable[[int], None]) -> Arrays:
        """One sample's record (arrays only: it is stored as npz). ``advance(k)`` may report
        that ``k`` of the sample's units are done, for long samples (a clip's frames)."""
        raise NotImplementedError

    def merge_records(self, ctx: AccuracyContext, samples: list[PassSample], records: list[Arrays]) -> dict[str, float]:
        """The pass's figures from every sample's record, both in ``accuracy_samples`` order."""
        raise NotImplementedError

    def evaluate(self, ctx: AccuracyContext) -> dict[str, float]:
        """The whole pass in this process: every sample scored (or resumed from its record), then
        merged. A slice may instead override this alone; its pass then cannot be sharded."""
        samples = self.accuracy_samples(ctx)
        return self.merge_records(ctx, samples, score_samples(self, ctx, samples))

    def make_known_answer(self, root: Path) -> KnownAnswer:
        """Write a small synthetic dataset and checkpoints under ``root`` with a computable answer."""
        raise NotImplementedError

    # Whether ``calibrate_agreement`` writes checkpoints for the agreement gate; a slice whose
    # seeded weights already score the known-answer set informatively leaves it False.
    calibrates_agreement: bool = False

    def calibrate_agreement(
        self, answer: KnownAnswer, samples: int, weights_root: Path, dims: dict[str, int]
    ) -> None:
        """Write checkpoints for every network under ``weights_root/<model>/`` (the staged layout)
        that make the agreement gate's metrics informative on the first ``samples`` samples of
        ``answer``'s dataset, run at ``dims`` (its profile's): neither 0 nor perfect, so a deployed backend that moves the network's
        outputs moves them. The networks stay the real ones (seeded weights, with the layers the
        slice documents set in closed form from torch eager features of those samples), exported
        and run on the backend like any checkpoint; no oracle takes part in the run."""
        raise NotImplementedError(f"{type(self).__name__} does not calibrate its agreement weights")

    def sample_figures(self, record: Arrays) -> dict[str, float]:
        """The figures of one sample's record that a person compares across samples (per pair EPE,
        per clip AKD): kept in the run history by sample name. Default: its scalar entries."""
        return {name: float(np.asarray(value).ravel()[0]) for name, value in record.items()
                if np.size(value) == 1 and np.issubdtype(np.asarray(value).dtype, np.number)}

    # -- pictures ---------------------------------------------------------------------------------
    def disagreement_picture(self, network: str, feeds: Mapping[str, np.ndarray], reference: Arrays,
                             actual: Arrays) -> np.ndarray | None:
        """A picture (HxWx3 uint8, BGR; see tooling/pictures.py) of how one call's outputs on a
        deployed backend (``actual``) differ from torch eager's (``reference``), as a person
        would judge it: keypoints over the image, flow fields, skeletons. None: nothing to draw."""
        return None


def splits_its_pass(model_slice: ModelSlice) -> bool:
    """Whether the slice lists samples and merges records (so its pass can be sharded)."""
    return type(model_slice).accuracy_samples is not ModelSlice.accuracy_samples


def score_samples(model_slice: ModelSlice, ctx: AccuracyContext, samples: list[PassSample],
                  total: int | None = None, offset: int = 0) -> list[Arrays]:
    """Each sample's record, from ``ctx.results`` where already kept, else scored and kept; progress
    is reported in the slice's unit, counted from ``offset`` of ``total`` (default: these samples)."""
    unit = model_slice.accuracy_unit
    total = sum(s.units for s in samples) if total is None else total
    done = offset
    records = []
    for sample in samples:
        def advance(k: int, before: int = done) -> None:
            ctx.progress(min(before + k, total), total, unit)

        records.append(ctx.results.cached(
            sample.id, lambda sample=sample, advance=advance: model_slice.score_sample(ctx, sample, advance)))
        ctx.sample_figures[sample.id] = model_slice.sample_figures(records[-1])
        done += sample.units
        ctx.progress(min(done, total), total, unit)
    return records
