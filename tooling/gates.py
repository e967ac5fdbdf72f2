"""The registry of conformance gates. Each gate is defined once here: its label in the grid, JSON
report and JUnit properties; the pytest markers its rows carry; what kind of figure its rows record
(which fixes how the report shows their cells, tooling/report.py ``FIGURES``); how it is
parametrized from a model's yaml; which backends its rows run on; and whether the plugin skips a
row whose backend this host lacks (or fails it, under --require-backends).

A test in ``ConformanceSuite`` declares its gate with ``@gate("label")``, which also applies the
gate's markers; the pytest plugin finds the gate through that mark, never through the test's name,
so renaming a test changes neither what is collected nor how it is labelled. A test with no
``@gate`` is a plain test: the plugin leaves it alone. The README's gate table lists the same
labels (tests/engine/test_gates.py holds them together).

To add a gate: write a ``_params_<x>(ctx)`` function below returning ``(argnames, params)``,
register it in ``GATES``, and decorate the test with ``@gate("<label>")``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pytest

from tooling import planning
from tooling.accuracy import REFERENCE_BACKEND
from tooling.backends import BACKENDS
from tooling.backends.base import Backend
from tooling.model_spec import Case, ModelSpec
from tooling.shards import Shard, merge_id
from tooling.slice import splits_its_pass
from tooling.sources import upstream_source

ATTRIBUTE = "zoo_gate"

Params = tuple[str | Sequence[str], list[Any]]

# Which deployed backends a gate's rows may run on. A backend with no device marker runs on the host CPU.
SERVES: dict[str, Callable[[type[Backend]], bool]] = {
    "deployed": lambda backend: True,
    "cpu": lambda backend: backend.marker is None,
    "device": lambda backend: backend.marker is not None,  # NPU, GPU
}


@dataclass(frozen=True)
class Gate:
    label: str  # the gate's name in the grid, the JSON report and JUnit properties
    markers: tuple[str, ...]  # pytest markers of every row (the model's, slow and npu/gpu come per row)
    kind: str  # what a row records: parity, accuracy, agreement, throughput or speedup (its cell's figure)
    parametrize: Callable[["GateContext"], Params] | None  # None: one row per model
    backend_arg: str | None  # the parameter holding a row's backend, if any
    default_backend: str  # the backend a row names when no parameter holds one
    serves: str | None = None  # the deployed backends its rows run on (a SERVES key); None: references only
    checks_backend: bool = False  # a row whose backend is unavailable here is skipped by the plugin
    shown_as: tuple[str, ...] = ()  # other labels a row may take once it ran (tooling.conformance.relabel)
    # What a verdict depends on besides code, yaml and fixtures (tooling/verdict_key.py): the
    # references it runs besides the row's own backend (and serving_backends for a gate without a
    # backend parameter), the staged inputs it reads, and whether it is a timing (host-dependent).
    uses: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()  # checkpoints, data, upstream
    timed: bool = False

    def row_backend(self, params: dict[str, Any]) -> str:
        """The backend a row names: its backend parameter, else the gate's default."""
        value = params.get(self.backend_arg) if self.backend_arg else None
        return value if isinstance(value, str) else self.default_backend


def gate_backends(gate: Gate, selected: tuple[str, ...] | None) -> list[str]:
    """The deployed backends ``gate`` runs on, as far as --backends (``selected``) keeps them."""
    if gate.serves is None:
        return []
    return [name for name, cls in BACKENDS.items() if cls.deployed and SERVES[gate.serves](cls)
            and (selected is None or name in selected)]


def serving_backends(spec: ModelSpec, case: Case, gate: Gate, selected: tuple[str, ...] | None = None,
                     nightly: bool = True) -> list[str]:
    """The deployed backends that ``gate`` runs ``case`` on: the gate's kind of backend, kept by
    --backends, serving the case (its variant, profile and shape); ``nightly=False`` (a run
    without the nightly tier) leaves out those whose rows on a CPU-tier case are nightly-only
    (``planning.nightly_only``)."""
    return [b for b in gate_backends(gate, selected) if planning.case_runs_on(spec, case, b)
            and (nightly or case.slow or not planning.nightly_only(spec, case, b))]


@dataclass(frozen=True)
class GateContext:
    """What a parametrization sees: the model's spec and cases, and the run's selection options."""

    spec: ModelSpec
    cases: list[Case]
    exporters: tuple[str, ...] | None  # --exporter
    selected_backends: tuple[str, ...] | None  # --backends
    accuracy_backend: str | None  # --accuracy-backend: a deployed backend, "torch" or "all"
    accuracy_shards: int = 1  # --accuracy-shards: parts of each dataset pass, merged by a last item
    available: Callable[[str], bool] | None = None  # whether a backend runs on this host (None: unknown)

    def backends(self, label: str) -> list[str]:
        return gate_backends(GATES[label], self.selected_backends)

    def serving_backends(self, case: Case, label: str) -> list[str]:
        return serving_backends(self.spec, case, GATES[label], self.selected_backends)

    def nightly_only(self, case: Case, backend: str) -> bool:
        return planning.nightly_only(self.spec, case, backend, self.exporters)

    def timed(self, case: Case) -> bool:
        """One artifact per shape is enough to time: the default exporter unless --exporter says."""
        return bool(self.exporters) or case.exporter == self.spec.networks[case.network].default_exporter


def backend_marks(backend: str) -> list:
    marker = BACKENDS[backend].marker if backend in BACKENDS else None
    return [getattr(pytest.mark, marker)] if marker else []


def case_params(cases: Sequence[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] * c.slow) for c in cases]


def case_backend_params(ctx: GateContext, pairs: Sequence[tuple[Case, str]]) -> list:
    return [
        pytest.param(c, b, id=f"{c.id}-{b}", marks=[pytest.mark.slow] * ctx.nightly_only(c, b) + backend_marks(b))
        for c, b in pairs
    ]


def _params_golden(ctx: GateContext) -> Params:
    goldens = [
        pytest.param({**g, "network": net.name}, id="-".join([net.name, g["file"].removesuffix(".npz")]
                                                              + ([g["variant"]] if "variant" in g else [])),
                     marks=[pytest.mark.slow] if g.get("slow") else [])
        for net in ctx.spec.networks.values() for g in net.goldens
    ]
    return "golden", goldens


def _params_onnx_vs_torch(ctx: GateContext) -> Params:
    # The ONNX reference is ONNX Runtime: variants it cannot execute are checked on their target.
    runnable = [c for c in ctx.cases if ctx.spec.networks[c.network].variant(c.variant).runs_on("onnxruntime")]
    return "case", case_params(runnable)


def _params_deployed(ctx: GateContext) -> Params:
    pairs = [(c, b) for c in ctx.cases for b in ctx.serving_backends(c, "deployed-vs-onnx")]
    return ("case", "deployed_backend"), case_backend_params(ctx, pairs)


def _params_decoded(ctx: GateContext) -> Params:
    pairs = [
        (c, b) for c in ctx.cases if ctx.spec.networks[c.network].decoded
        for b in ctx.serving_backends(c, "decoded-vs-torch")
    ]
    return ("case", "deployed_backend"), case_backend_params(ctx, pairs)


def _params_chain(ctx: GateContext) -> Params:
    """Each yaml chain at each profile that builds all its networks, on every deployed backend
    that serves each of them."""
    params = [
        pytest.param(c, b, id=f"{c.id}-{b}", marks=[pytest.mark.slow] * chain_nightly_only(ctx, c, b) + backend_marks(b))
        for c in planning.chain_cases(ctx.spec) for b in ctx.backends("chain-vs-torch")
        if planning.chain_runs_on(ctx.spec, c, b)
    ]
    return ("chain_case", "deployed_backend"), params


def chain_nightly_only(ctx: GateContext, chain_case, backend: str) -> bool:
    """A chain row is nightly-only where its profile is slow or any member's row on the backend is."""
    return chain_case.slow or any(
        ctx.nightly_only(planning.chain_member(ctx.spec, chain_case, n, backend, ctx.exporters), backend)
        for n in ctx.spec.chains[chain_case.chain].networks)


def _params_upstream(ctx: GateContext) -> Params:
    """The first case of each network an upstream checkout builds."""
    built = [name for name in ctx.spec.networks if upstream_source(ctx.spec, name) is not None]
    first_per_network: dict[str, Case] = {}
    for case in ctx.cases:
        if case.network in built:
            first_per_network.setdefault(case.network, case)
    for name in built:
        first_per_network.setdefault(name, _undeployed_case(ctx.spec, name))
    return "case", case_params(list(first_per_network.values()))


def _undeployed_case(spec: ModelSpec, network: str) -> Case:
    """A network no profile deploys (DEKR's host-side rescoring net, FOMM's pose net) at batch 1,
    its other dims from the first profile that sets them all (the smoke one, as a rule)."""
    net = spec.networks[network]
    symbolic = sorted({d for i in net.inputs for d in i.shape if isinstance(d, str)} - {"batch"})
    dims = next((p.dims for p in spec.profiles.values() if set(symbolic) <= set(p.dims)), {})
    profile = "dims:" + ",".join(f"{d}={dims[d]}" for d in symbolic if d in dims)
    return Case(spec.name, network, profile, 1, net.default_exporter, net.default_variant, False)


def default_accuracy_backends(runnable: Sequence[str], available: Callable[[str], bool] | None) -> list[str]:
    """Where a staged pass runs unless --accuracy-backend says: a full dataset pass is long, so on
    one deployed backend. On an NPU host the OM; elsewhere the first deployed CPU backend that runs
    here (ONNX Runtime, in registry order); else the first that runs here at all. Backends are
    asked in that order and no further than needed (some availability checks take seconds)."""
    here = available or (lambda name: True)
    if "om" in runnable and here("om"):
        return ["om"]
    on_cpu = SERVES["cpu"]
    ordered = [b for b in runnable if on_cpu(BACKENDS[b])] + [b for b in runnable if not on_cpu(BACKENDS[b])]
    return next(([b] for b in ordered if b != "om" and here(b)), list(runnable[:1]))


def _params_accuracy(ctx: GateContext) -> Params:
    """The staged dataset pass: on the host's default backend (``default_accuracy_backends``), on
    every deployed backend that serves the accuracy profile (``--accuracy-backend all``: its
    variants and its ``exclude_backends`` both decide), on the one named, or on torch eager (the
    reference pipeline, ``--accuracy-backend torch``). With ``--accuracy-shards N`` (and a slice
    that splits its pass), each row becomes N shard items that workers score at once and a merge
    item that computes the figure and holds the verdict."""
    spec = ctx.spec
    names = ("accuracy_backend", "accuracy_part")
    if spec.accuracy is None:
        return names, []
    profile_cases = [c for c in planning.cases(spec) if c.profile == spec.accuracy.profile]
    # The pass picks each sample's shape (DEKR: its ATC bucket), not the profile's dims.
    runnable = [b for b in ctx.backends("accuracy")
                if any(planning.case_runs_on(spec, c, b, at_profile_shape=False) for c in profile_cases)]
    chosen = ctx.accuracy_backend
    if chosen is not None and chosen not in (*runnable, REFERENCE_BACKEND, "all"):
        reason = f"--accuracy-backend {chosen}: profile {spec.accuracy.profile} is not served by it (served by: {runnable})"
        return names, [pytest.param(chosen, None, id=chosen, marks=[pytest.mark.skip(reason=reason)])]
    backends = (default_accuracy_backends(runnable, ctx.available) if chosen is None
                else runnable if chosen == "all" else [chosen])
    count = ctx.accuracy_shards
    if count > 1 and not splits_its_pass(spec.load_slice()):
        count = 1  # a slice that only overrides evaluate() scores its pass whole
    if count == 1:
        return names, [pytest.param(b, None, id=b, marks=backend_marks(b)) for b in backends]
    parts = [*(Shard(k, count) for k in range(1, count + 1)), merge_id(count)]
    return names, [pytest.param(b, part, id=f"{b}-{getattr(part, 'id', part)}", marks=backend_marks(b))
                   for b in backends for part in parts]


def _params_agreement(ctx: GateContext) -> Params:
    """Every deployed backend, for models with an accuracy gate; whether the backend serves the
    known-answer set's profile is known only once the slice has written it."""
    if ctx.spec.accuracy is None:
        return "deployed_backend", []
    return "deployed_backend", [
        pytest.param(b, id=b, marks=backend_marks(b) + [pytest.mark.slow] * planning.agreement_nightly_only(ctx.spec, b))
        for b in ctx.backends("accuracy-agreement")]


def _params_throughput(ctx: GateContext) -> Params:
    """Device backends (NPU, GPU) against the guides' floors; CPU backends are timed against torch
    eager, interleaved, by the speed-up gate, so none of them is a throughput row."""
    pairs = [(case, backend) for case in filter(ctx.timed, ctx.cases) for backend in ctx.serving_backends(case, "throughput")]
    return ("case", "backend"), case_backend_params(ctx, pairs)


def _params_cpu_speedup(ctx: GateContext) -> Params:
    """One row per timed case, nightly-only as ``planning.speedup_nightly_only`` says."""
    timed = [c for c in ctx.cases if ctx.timed(c) and ctx.serving_backends(c, "cpu-speedup")]
    return "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] * planning.speedup_nightly_only(ctx.spec, c))
                    for c in timed]


GATES: dict[str, Gate] = {
    g.label: g
    for g in (
        Gate("golden", ("parity",), "parity", _params_golden, None, "torch", uses=("torch",)),
        # The upstream import may stand in ONNX Runtime kernels (DEKR's DeformConv2d).
        Gate("port-vs-upstream", ("parity", "upstream"), "parity", _params_upstream, None, "torch",
             uses=("torch", "onnx"), reads=("upstream",)),
        Gate("onnx-vs-torch", ("parity",), "parity", _params_onnx_vs_torch, None, "onnx", uses=("torch", "onnx"),
             reads=("checkpoints",)),
        Gate("deployed-vs-onnx", ("parity",), "parity", _params_deployed, "deployed_backend", "onnxruntime",
             serves="deployed", checks_backend=True, uses=("torch", "onnx"), reads=("checkpoints",)),
        Gate("decoded-vs-torch", ("parity",), "parity", _params_decoded, "deployed_backend", "onnxruntime",
             serves="deployed", checks_backend=True, uses=("torch",), reads=("checkpoints",)),
        Gate("chain-vs-torch", ("parity",), "parity", _params_chain, "deployed_backend", "onnxruntime",
             serves="deployed", checks_backend=True, uses=("torch",), reads=("checkpoints",)),
        Gate("accuracy", ("accuracy",), "accuracy", _params_accuracy, "accuracy_backend", "onnxruntime",
             serves="deployed", checks_backend=True, uses=("torch",), reads=("checkpoints", "data")),
        # Generated data and weights only: nothing staged is read.
        Gate("accuracy-known-answer", ("accuracy",), "accuracy", None, None, "onnxruntime", checks_backend=True,
             shown_as=("accuracy-oracle",), uses=("torch", "onnxruntime")),
        Gate("accuracy-agreement", ("accuracy",), "agreement", _params_agreement, "deployed_backend", "onnxruntime",
             serves="deployed", checks_backend=True, uses=("torch",)),
        Gate("throughput", ("benchmark",), "throughput", _params_throughput, "backend", "torch",
             serves="device", checks_backend=True, reads=("checkpoints",), timed=True),
        # Its backends are every deployed CPU one that serves the case (serving_backends).
        Gate("cpu-speedup", ("benchmark",), "speedup", _params_cpu_speedup, None, "best-cpu", serves="cpu",
             uses=("torch",), reads=("checkpoints",), timed=True),
    )
}


def gate(label: str) -> Callable[[Callable], Callable]:
    """Declare which registered gate a ``ConformanceSuite`` test implements."""
    if label not in GATES:
        raise KeyError(f"no gate {label!r} in tooling/gates.py GATES (known: {sorted(GATES)})")

    def mark(function: Callable) -> Callable:
        setattr(function, ATTRIBUTE, GATES[label])
        for marker in GATES[label].markers:
            function = getattr(pytest.mark, marker)(function)
        return function

    return mark


def gate_of(function: Callable | None) -> Gate | None:
    return getattr(function, ATTRIBUTE, None)
