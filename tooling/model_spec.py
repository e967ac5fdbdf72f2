"""Per-model facts, as read from ``baselines/<model>.yaml`` (by tooling/baseline.py): plain
dataclasses that import no backend, so what depends on them (every slice, through its fixtures
path) does not depend on backend code.

Everything the engine needs to know about a model lives in its yaml (shapes, tolerances, targets,
floors, ATC settings) or in its slice package (network port, pre/post-processing, metric). The
engine itself never branches on a model name.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tooling.schema import EXPORTER_NAMES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Overridable so a model can live outside this repository (see BASELINES_DIR in tooling/baseline.py).
FIXTURES_DIR = Path(os.environ.get("ZOO_FIXTURES_DIR", PROJECT_ROOT / "fixtures"))
PATCHES_DIR = Path(os.environ.get("ZOO_PATCHES_DIR", PROJECT_ROOT / "patches"))

EXPORTERS = EXPORTER_NAMES


class ModelSpecError(ValueError):
    """A baseline yaml is missing a field or holds a value of the wrong kind."""


@dataclass(frozen=True)
class Tolerance:
    """|actual - expected| <= max(atol, atol_of_max * max|expected|) + rtol * |expected|.

    ``atol_of_max`` scales the absolute bound with the output's range, for outputs whose scale
    depends on the weights (seeded weights can drive a heatmap to 1e4, a checkpoint keeps it < 1).
    ``allow_nonfinite`` (yaml ``allow_nonfinite: true``) is for an output that may legitimately hold
    NaN or Inf: then they must sit at the same places on both sides. Otherwise any NaN or Inf, on
    either side, is a violation (an all-NaN result must never agree with an all-NaN reference).
    ``max_fraction_out`` lets that fraction of (finite) elements exceed the bound: for decoded
    argmax outputs, where a precision change flips the peak of a near-flat map to another cell.
    """

    atol: float
    rtol: float
    min_cosine: float = 0.0
    atol_of_max: float = 0.0
    allow_nonfinite: bool = False
    max_fraction_out: float = 0.0

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> "Tolerance":
        allow_nonfinite = raw.get("allow_nonfinite", False) if isinstance(raw, dict) else False
        if not isinstance(allow_nonfinite, bool):
            raise ModelSpecError(f"{where}: allow_nonfinite must be true or false, got {allow_nonfinite!r}")
        try:
            return cls(float(raw["atol"]), float(raw["rtol"]), float(raw.get("min_cosine", 0.0)),
                       float(raw.get("atol_of_max", 0.0)), allow_nonfinite,
                       float(raw.get("max_fraction_out", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelSpecError(f"{where}: tolerance needs numeric atol and rtol ({exc})") from exc


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as exc:
            raise ModelSpecError(f"input {self.name}: dimension {exc} is not set by the profile") from exc


@dataclass(frozen=True)
class Variant:
    """One way of expressing the network in ONNX (e.g. a deformable conv as grid_sample or DeformConv)."""

    name: str
    backends: tuple[str, ...] | None = None  # None: every backend
    exporters: tuple[str, ...] | None = None
    opset: dict[str, int] = field(default_factory=dict)  # overrides the network's, per exporter

    def runs_on(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[InputSpec, ...]
    outputs: dict[str, Tolerance]
    opset: dict[str, int]
    default_exporter: str
    variants: tuple[Variant, ...]
    checkpoint_files: tuple[str, ...]
    checkpoint_keys: tuple[str, ...]
    goldens: tuple[dict[str, Any], ...]
    decoded: dict[str, Tolerance] = field(default_factory=dict)
    om: dict[str, Any] = field(default_factory=dict)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    @property
    def default_variant(self) -> str:
        return self.variants[0].name

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ModelSpecError(f"network {self.name}: unknown variant {name!r}")


@dataclass(frozen=True)
class Profile:
    name: str
    dims: dict[str, int]
    batch_sizes: tuple[int, ...]
    exporters: tuple[str, ...] | None
    slow: bool
    benchmark_rounds: int
    networks: tuple[str, ...] | None
    exclude_backends: tuple[str, ...] = ()  # e.g. a compile step too slow for this tier
    # Backends whose rows at this profile run in the nightly tier only: a compile the CPU tier
    # already pays once at another profile of the same network (AOTInductor at a second shape).
    nightly_backends: tuple[str, ...] = ()

    def runs_on(self, backend: str) -> bool:
        return backend not in self.exclude_backends


@dataclass(frozen=True)
class Case:
    """One exported artifact: network x profile x batch x exporter x variant."""

    model: str
    network: str
    profile: str
    batch: int
    exporter: str
    variant: str
    slow: bool

    @property
    def id(self) -> str:
        parts = [self.network, self.profile, f"b{self.batch}", self.exporter]
        if self.variant != "default":
            parts.append(self.variant)
        return "-".join(parts)


@dataclass(frozen=True)
class ChainSpec:
    """Networks that only make sense together (one feeds the next): the slice's ``run_chain``
    wires them from ``inputs``; the chain gate compares its ``outputs`` across backends."""

    name: str
    networks: tuple[str, ...]
    inputs: tuple[InputSpec, ...]
    outputs: dict[str, Tolerance]


@dataclass(frozen=True)
class ChainCase:
    """One chain at one profile and batch (each network's artifact is that profile's case)."""

    chain: str
    profile: str
    batch: int
    slow: bool

    @property
    def id(self) -> str:
        return f"{self.chain}-{self.profile}-b{self.batch}"


@dataclass(frozen=True)
class AccuracySpec:
    metric: str
    target: float
    tolerance: float
    higher_is_better: bool
    reference: float | None
    data: tuple[str, ...]
    profile: str
    extra_targets: dict[str, float]
    # Per metric, the largest difference allowed between torch eager and a deployed backend
    # running the real network (seeded weights) on the first ``agreement_samples`` samples of
    # the known-answer set: the network-in-the-loop agreement gate.
    agreement: dict[str, float] = field(default_factory=dict)
    agreement_samples: int = 4
    # Per backend tolerance key (``om@force_fp16``, then ``om``), bounds that replace those of
    # ``agreement`` for the metrics they name: a precision that rounds every tensor moves the
    # metrics further than an fp32 runtime does (planning.agreement_bounds).
    agreement_by_backend: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per extra target, its own (higher_is_better, tolerance) where the yaml gives them; otherwise
    # the main metric's direction and tolerance apply.
    extra_rules: dict[str, tuple[bool, float]] = field(default_factory=dict)

    def passes(self, value: float, target: float | None = None) -> bool:
        goal = self.target if target is None else target
        if self.higher_is_better:
            return value >= goal - self.tolerance
        return value <= goal + self.tolerance

    def passes_extra(self, name: str, value: float) -> bool:
        """Whether metric ``name`` meets its extra target, in its own direction and tolerance."""
        higher, tolerance = self.extra_rules.get(name, (self.higher_is_better, self.tolerance))
        goal = self.extra_targets[name]
        return value >= goal - tolerance if higher else value <= goal + tolerance


@dataclass(frozen=True)
class ThroughputSpec:
    unit: str
    items_per_call: tuple[str, ...]
    # device class -> profile -> batch -> the guide's figure. Keyed by the shape the guide measured
    # (a profile holds its dims), so a figure is never applied to a shape it was not measured at.
    floors: dict[str, dict[str, dict[int, float]]]
    cpu_speedup_vs_torch: float

    def floor(self, device: str, profile: str, batch: int) -> float | None:
        """The guide's figure for this device class at exactly this profile and batch, if any."""
        return self.floors.get(device, {}).get(profile, {}).get(batch)

    def items(self, dims: dict[str, int], batch: int) -> int:
        values = {**dims, "batch": batch}
        return math.prod(int(values[name]) for name in self.items_per_call)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    guide: str
    slice_module: str
    upstream: dict[str, Any]  # checkout name -> repository, commit, requires, networks (tooling/sources.py)
    networks: dict[str, NetworkSpec]
    profiles: dict[str, Profile]
    accuracy: AccuracySpec | None
    throughput: ThroughputSpec
    backend_tolerances: dict[str, dict[str, Tolerance]]
    om: dict[str, Any]
    raw: dict[str, Any]
    chains: dict[str, ChainSpec] = field(default_factory=dict)

    @property
    def fixtures(self) -> Path:
        return FIXTURES_DIR / self.name

    def _backend_tolerance(self, key: str | None, name: str) -> Tolerance | None:
        """``backend_tolerances`` for a backend key: ``om@force_fp16`` first, then ``om``."""
        if not key:
            return None
        for candidate in (key, key.split("@", 1)[0]):
            if name in self.backend_tolerances.get(candidate, {}):
                return self.backend_tolerances[candidate][name]
        return None

    def tolerance(self, network: str, output: str, backend: str | None = None) -> Tolerance:
        """Raw-output tolerance; ``backend`` is a backend's tolerance key (``Backend.tolerance_key``)."""
        return self._backend_tolerance(backend, output) or self.networks[network].outputs[output]

    def decoded_tolerance(self, network: str, name: str, backend: str | None = None) -> Tolerance:
        """Tolerance of a decoded output (what the task reports) on a backend, same lookup."""
        return self._backend_tolerance(backend, name) or self.networks[network].decoded[name]

    def dims(self, case: Case) -> dict[str, int]:
        """The profile's dims that the network's inputs use, plus the batch. Other dims of the
        profile (settings of the slice's pipeline) do not reach the artifact, so a case and the
        accuracy pass at the same input shapes share one build."""
        used = {d for i in self.networks[case.network].inputs for d in i.shape if isinstance(d, str)}
        dims = {k: v for k, v in self.profiles[case.profile].dims.items() if k in used}
        return {**dims, "batch": case.batch}

    def chain_tolerance(self, chain: str, output: str, backend: str | None = None) -> Tolerance:
        """A chain output's tolerance; ``backend`` is a backend's tolerance key, as for ``tolerance``."""
        return self._backend_tolerance(backend, output) or self.chains[chain].outputs[output]

    def load_slice(self):
        module = importlib.import_module(self.slice_module)
        try:
            return module.SLICE
        except AttributeError as exc:
            raise ModelSpecError(f"{self.slice_module} defines no SLICE object") from exc
