"""Per-model facts, read from ``baselines/<model>.yaml``.

Everything the engine needs to know about a model lives in its yaml (shapes, tolerances, targets,
floors, ATC settings) or in its slice package (network port, pre/post-processing, metric). The
engine itself never branches on a model name.
"""
from __future__ import annotations

import importlib
import itertools
import math
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tooling.schema import EXPORTER_NAMES, reference_errors, schema_errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Overridable so a model can live outside this repository (and so the engine's own tests can
# add a throw-away model without touching the real baselines).
BASELINES_DIR = Path(os.environ.get("ZOO_BASELINES_DIR", PROJECT_ROOT / "baselines"))
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

    def runs_on(self, backend: str) -> bool:
        return backend not in self.exclude_backends

    def label(self) -> str:
        return self.name


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
    upstream: dict[str, Any]
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

    @property
    def patches(self) -> Path:
        return PATCHES_DIR / self.name

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

    def cases(self, *, exporters: tuple[str, ...] | None = None) -> list[Case]:
        """Every (network, profile, batch, exporter, variant) the yaml declares, smoke before slow."""
        result: list[Case] = []
        for profile in self.profiles.values():
            for net in self.networks.values():
                if profile.networks is not None and net.name not in profile.networks:
                    continue
                wanted = profile.exporters or (net.default_exporter,)
                if exporters:
                    wanted = tuple(e for e in wanted if e in exporters) or (
                        tuple(e for e in exporters if e in EXPORTERS)[:1]
                    )
                for batch, exporter, variant in itertools.product(profile.batch_sizes, wanted, net.variants):
                    if variant.exporters is not None and exporter not in variant.exporters:
                        continue
                    result.append(
                        Case(self.name, net.name, profile.name, batch, exporter, variant.name, profile.slow)
                    )
        return sorted(result, key=lambda c: c.slow)

    def case_runs_on(self, case: Case, backend: str, *, at_profile_shape: bool = True) -> bool:
        """Whether ``backend`` serves ``case``: its export variant runs there, its profile keeps it,
        and the backend's artifact can take the case's shape (an OM's --dynamic_dims gears).
        ``at_profile_shape=False`` leaves the shape out, for passes whose shapes come from the data
        (the accuracy pass picks DEKR's bucket per image)."""
        from tooling.backends import BACKENDS  # the registry imports this module

        return (
            self.networks[case.network].variant(case.variant).runs_on(backend)
            and self.profiles[case.profile].runs_on(backend)
            and (not at_profile_shape or backend not in BACKENDS or BACKENDS[backend].serves(self, case))
        )

    def dims(self, case: Case) -> dict[str, int]:
        """The profile's dims that the network's inputs use, plus the batch. Other dims of the
        profile (settings of the slice's pipeline) do not reach the artifact, so a case and the
        accuracy pass at the same input shapes share one build."""
        used = {d for i in self.networks[case.network].inputs for d in i.shape if isinstance(d, str)}
        dims = {k: v for k, v in self.profiles[case.profile].dims.items() if k in used}
        return {**dims, "batch": case.batch}

    def chain_cases(self, *, exporters: tuple[str, ...] | None = None) -> list[ChainCase]:
        """Each chain at every profile (and batch) that builds all of its networks."""
        result = []
        for chain in self.chains.values():
            for profile in self.profiles.values():
                if profile.networks is not None and not set(chain.networks) <= set(profile.networks):
                    continue
                result += [ChainCase(chain.name, profile.name, b, profile.slow) for b in profile.batch_sizes]
        return sorted(result, key=lambda c: c.slow)

    def chain_member(self, chain_case: ChainCase, network: str, backend: str,
                     exporters: tuple[str, ...] | None = None) -> Case | None:
        """The case of ``network`` in ``chain_case`` that ``backend`` serves (None if none does)."""
        return next((
            c for c in self.cases(exporters=exporters)
            if (c.network, c.profile, c.batch) == (network, chain_case.profile, chain_case.batch)
            and self.case_runs_on(c, backend)
        ), None)

    def chain_runs_on(self, chain_case: ChainCase, backend: str) -> bool:
        return all(self.chain_member(chain_case, n, backend) for n in self.chains[chain_case.chain].networks)

    def chain_tolerance(self, chain: str, output: str, backend: str | None = None) -> Tolerance:
        """A chain output's tolerance; ``backend`` is a backend's tolerance key, as for ``tolerance``."""
        return self._backend_tolerance(backend, output) or self.chains[chain].outputs[output]

    def load_slice(self):
        module = importlib.import_module(self.slice_module)
        try:
            return module.SLICE
        except AttributeError as exc:
            raise ModelSpecError(f"{self.slice_module} defines no SLICE object") from exc


def _require(raw: dict, key: str, where: str) -> Any:
    if key not in raw:
        raise ModelSpecError(f"{where}: missing required field {key!r}")
    return raw[key]


def _parse_inputs(raw: dict, where: str) -> tuple[InputSpec, ...]:
    return tuple(
        InputSpec(iname, tuple(spec["shape"]), spec.get("dtype", "float32"))
        for iname, spec in _require(raw, "inputs", where).items()
    )


def _parse_outputs(raw: dict, where: str) -> dict[str, Tolerance]:
    return {
        oname: Tolerance.parse(spec, f"{where}.outputs.{oname}")
        for oname, spec in _require(raw, "outputs", where).items()
    }


def _parse_chain(name: str, raw: dict, where: str, networks: dict[str, NetworkSpec]) -> ChainSpec:
    where = f"{where}: chains.{name}"
    members = tuple(_require(raw, "networks", where))
    unknown = [n for n in members if n not in networks]
    if len(members) < 2 or unknown:
        raise ModelSpecError(f"{where}: networks must name two or more of {sorted(networks)} (unknown: {unknown})")
    return ChainSpec(name, members, _parse_inputs(raw, where), _parse_outputs(raw, where))


def _parse_network(name: str, raw: dict, where: str) -> NetworkSpec:
    where = f"{where}: networks.{name}"
    inputs = _parse_inputs(raw, where)
    outputs = _parse_outputs(raw, where)
    opset = {str(k): int(v) for k, v in _require(raw, "opset", where).items()}
    exporter = raw.get("exporter", "torchscript")
    variants_raw = raw.get("variants") or {"default": {}}
    variants = tuple(
        Variant(
            vname,
            tuple(v["backends"]) if v and v.get("backends") else None,
            tuple(v["exporters"]) if v and v.get("exporters") else None,
            {str(k): int(o) for k, o in (v or {}).get("opset", {}).items()},
        )
        for vname, v in variants_raw.items()
    )
    checkpoint = raw.get("checkpoint", {})
    return NetworkSpec(
        name=name,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        default_exporter=exporter,
        variants=variants,
        checkpoint_files=tuple(checkpoint.get("files", ())),
        checkpoint_keys=tuple(checkpoint.get("state_keys", ())),
        goldens=tuple(raw.get("goldens", ())),
        decoded={
            dname: Tolerance.parse(spec, f"{where}.decoded.{dname}") for dname, spec in raw.get("decoded", {}).items()
        },
        om=raw.get("om", {}),
        dynamic_axes={k: {int(a): n for a, n in v.items()} for k, v in raw.get("dynamic_axes", {}).items()},
    )


def validate_baseline(raw: Any, where: str) -> None:
    """Raise ``ModelSpecError`` listing every unknown key, wrongly typed value and dangling name
    (tooling/schema.py) in a baseline, each with its key path, before any of it is used."""
    from tooling.backends import BACKENDS  # the registry imports backends that import this module

    problems = schema_errors(raw)
    if not problems:
        problems = reference_errors(raw, BACKENDS)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ModelSpecError(f"{where}: {len(problems)} problem(s) in the baseline:\n  {shown}{more}")


def parse_model_spec(raw: dict[str, Any], where: str) -> ModelSpec:
    validate_baseline(raw, where)
    name = _require(raw, "model", where)
    networks = {n: _parse_network(n, r, where) for n, r in _require(raw, "networks", where).items()}
    profiles = {}
    for pname, p in _require(raw, "profiles", where).items():
        profiles[pname] = Profile(
            name=pname,
            dims={k: int(v) for k, v in p.get("dims", {}).items()},
            batch_sizes=tuple(int(b) for b in p.get("batch_sizes", raw.get("batch_sizes", [1]))),
            exporters=tuple(p["exporters"]) if p.get("exporters") else None,
            slow=bool(p.get("slow", False)),
            benchmark_rounds=int(p.get("benchmark_rounds", 10)),
            networks=tuple(p["networks"]) if p.get("networks") else None,
            exclude_backends=tuple(p.get("exclude_backends", ())),
        )
    acc = raw.get("accuracy")
    accuracy = None
    if acc:
        accuracy = AccuracySpec(
            metric=_require(acc, "metric", f"{where}: accuracy"),
            target=float(_require(acc, "target", f"{where}: accuracy")),
            tolerance=float(acc.get("tolerance", 0.0)),
            higher_is_better=bool(_require(acc, "higher_is_better", f"{where}: accuracy")),
            reference=float(acc["upstream_reference"]) if "upstream_reference" in acc else None,
            data=tuple(acc.get("data", ())),
            profile=acc.get("profile", next(iter(profiles))),
            extra_targets={k: float(v["target"] if isinstance(v, dict) else v)
                           for k, v in acc.get("extra_targets", {}).items()},
            extra_rules={
                k: (bool(v.get("higher_is_better", acc["higher_is_better"])), float(v.get("tolerance", acc.get("tolerance", 0.0))))
                for k, v in acc.get("extra_targets", {}).items() if isinstance(v, dict)
            },
            agreement={k: float(v) for k, v in acc.get("agreement", {}).items()},
            agreement_samples=int(acc.get("agreement_samples", 4)),
        )
    thr = _require(raw, "throughput", where)
    floors = {  # the schema has checked the profile names and their batch sizes
        str(device): {str(p): {int(b): float(v) for b, v in per_batch.items()} for p, per_batch in per_profile.items()}
        for device, per_profile in (thr.get("floors") or {}).items()
    }
    throughput = ThroughputSpec(
        unit=thr.get("unit", "fps"),
        items_per_call=tuple(thr.get("items_per_call", ["batch"])),
        floors=floors,
        cpu_speedup_vs_torch=float(thr.get("cpu_speedup_vs_torch", 1.0)),
    )
    backend_tolerances = {
        backend: {o: Tolerance.parse(t, f"{where}: backend_tolerances.{backend}.{o}") for o, t in outs.items()}
        for backend, outs in raw.get("backend_tolerances", {}).items()
    }
    return ModelSpec(
        name=name,
        title=raw.get("title", name),
        guide=raw.get("guide", ""),
        slice_module=raw.get("slice", f"tooling.models.{name}"),
        upstream=raw.get("upstream", {}),
        networks=networks,
        profiles=profiles,
        accuracy=accuracy,
        throughput=throughput,
        backend_tolerances=backend_tolerances,
        om=raw.get("om", {}),
        raw=raw,
        chains={n: _parse_chain(n, c, where, networks) for n, c in (raw.get("chains") or {}).items()},
    )


@cache
def load_model_spec(name: str) -> ModelSpec:
    path = BASELINES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(model_names()) or "none"
        raise ModelSpecError(f"{path}: no baseline for model {name!r} (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelSpecError(f"{path}: not valid yaml ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelSpecError(f"{path}: expected a mapping at the top level")
    spec = parse_model_spec(raw, str(path))
    if spec.name != name:
        raise ModelSpecError(f"{path}: declares model {spec.name!r}, expected {name!r}")
    return spec


def model_names() -> list[str]:
    return sorted(p.stem for p in BASELINES_DIR.glob("*.yaml"))
