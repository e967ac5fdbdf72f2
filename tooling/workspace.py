"""The engine's front door: builds networks, ONNX files, compiled artifacts and sessions on demand.

Tests and the CLI ask a ``Workspace`` for a ``ModelHandle``; the handle turns (case, backend,
weights) into ready-to-run sessions through the artifact cache, memoising what a process reuses.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from tooling import planning
from tooling.backends import BACKENDS
from tooling.backends.base import Availability, Backend, BackendConfig, CompileRequest, Session
from tooling.baseline import load_model_spec
from tooling.cache import ArtifactCache, ArtifactKey, file_sha256
from tooling.export import export_onnx
from tooling.fingerprint import content_digest, source_digest
from tooling.jsonio import to_json, write_json
from tooling.locations import Roots, find_checkpoint
from tooling.model_spec import Case, ChainCase, ModelSpec
from tooling.roofline import GraphFlops, graph_flops
from tooling.slice import KnownAnswer, ModelSlice
from tooling.sources import UpstreamCheckout, UpstreamError, patches_digest, upstream_source
from tooling.weights import WeightsChoice, apply_weights

ONNX_FILE = "model.onnx"
PROBES = "probes"  # <cache>/probes/<backend>.json: Workspace.probe
RUNTIME_CACHE = "runtime"  # <cache>/runtime/<backend>/: a runtime's own compile cache (BackendConfig)
OPEN_SESSIONS = 4


@dataclass
class Options:
    threads: int = 1
    rebuild: bool = False
    exporters: tuple[str, ...] | None = None  # restricts the exporters a run uses
    backends: tuple[str, ...] | None = None  # restricts the backends a run uses
    weights: str = "auto"  # auto: staged checkpoint if present, else seeded; or "seeded"
    salt: str = "public"
    device: str | None = None
    accuracy_limit: int | None = None
    restart_accuracy: bool = False
    required_backends: tuple[str, ...] = ()  # unavailable: the gate fails instead of skipping
    run_id: str | None = None  # shared by the processes of one run (xdist workers): --rebuild once per run
    nightly: bool = False  # the nightly tier runs too: nightly-only backends join the speed gate's contenders


@dataclass
class Workspace:
    roots: Roots
    options: Options = field(default_factory=Options)

    def __post_init__(self):
        self.cache = ArtifactCache(self.roots.cache_dir, rebuild=self.options.rebuild, run_id=self.options.run_id)
        self._models: dict[str, ModelHandle] = {}
        self._backends: dict[str, Backend] = {}
        self._probes: dict[str, tuple[Availability, dict[str, str] | None]] = {}

    def model(self, name: str) -> "ModelHandle":
        if name not in self._models:
            self._models[name] = ModelHandle(self, load_model_spec(name))
        return self._models[name]

    @property
    def held_models(self) -> tuple[str, ...]:
        """The models whose handles (networks, sessions, references, memos) this process holds."""
        return tuple(self._models)

    def release(self, name: str) -> bool:
        """Drop model ``name``'s handle and everything it memoises (torch networks, open sessions
        with their runtimes' arenas, references, memos such as its agreement set): a run calls this
        once the model's tests on this process are done, so a worker holds one model's memory, not
        every model's. Artifacts stay in the cache; a later ``model(name)`` loads them again.
        Whether it held the model."""
        return self._models.pop(name, None) is not None

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            if name not in BACKENDS:
                raise KeyError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
            config = BackendConfig(threads=self.options.threads, device=self.options.device,
                                   runtime_cache=self.cache.root / RUNTIME_CACHE)
            self._backends[name] = BACKENDS[name](config)
        return self._backends[name]

    def availability(self, name: str) -> Availability:
        if self.options.backends is not None and name not in self.options.backends and name not in ("torch", "onnx"):
            return Availability(False, f"--backends {','.join(self.options.backends)}", selected=False)
        return self.probe(name)[0]

    def probe(self, name: str) -> tuple[Availability, dict[str, str] | None]:
        """Whether backend ``name`` runs on this host and, if it does, its ``versions()``: asked
        once per process, and where the backend says what the answers depend on
        (``Backend.probe_inputs``), kept in ``<cache>/probes/<name>.json`` under those inputs, so
        a later process with the same inputs reads them instead of asking again."""
        if name not in self._probes:
            backend = self.backend(name)
            inputs = backend.probe_inputs()
            path = self.cache.root / PROBES / f"{name}.json"
            stored = _read_probe(path) if inputs is not None else None
            if stored is not None and stored.get("inputs") == json.loads(to_json(inputs)):
                answer = (Availability(**stored["availability"]), stored["versions"])
            else:
                availability = backend.availability()
                answer = (availability, _versions(backend) if availability.ok else None)
                if inputs is not None:
                    try:
                        write_json(path, {"inputs": inputs, "availability": dataclasses.asdict(availability),
                                          "versions": answer[1]})
                    except OSError:
                        pass  # a read-only cache: asked again next process
            self._probes[name] = answer
        return self._probes[name]

    def with_roots(self, **changes: Path | None) -> "Workspace":
        """A workspace over other staging roots that shares this one's cache and options."""
        other = Workspace(replace(self.roots, **changes), self.options)
        other.cache = self.cache
        other._backends = self._backends
        other._probes = self._probes
        return other


# Engine code every artifact depends on besides the slice (and what they import).
EXPORT_CODE = ("tooling.export", "tooling.seeded", "tooling.weights")


class ModelHandle:
    def __init__(self, workspace: Workspace, spec: ModelSpec):
        self.ws = workspace
        self.spec = spec
        self.slice: ModelSlice = spec.load_slice()
        self._networks: dict[tuple, tuple[torch.nn.Module, str]] = {}
        # Sessions hold their runtime's memory arenas (GBs for TransPose at batch 64), so only the
        # few most recently used stay open; a closed one is reloaded from the artifact cache.
        self._sessions: OrderedDict[tuple, Session] = OrderedDict()
        self._references: dict[tuple, dict[str, np.ndarray]] = {}
        self._upstream: dict[str, UpstreamCheckout] = {}  # by checkout name
        self._flops: dict[str, GraphFlops] = {}
        # Objects built for this model that live as long as its handle (its known-answer set, its
        # agreement set with the torch eager pass): Workspace.release drops them with it.
        self.memo: dict[str, Any] = {}

    def with_own_sessions(self) -> "ModelHandle":
        """A handle on the same networks, references and workspace whose sessions (and whatever
        a caller swaps on it, a graph to load) are its own."""
        other = copy.copy(self)
        other._sessions = OrderedDict()
        return other

    @cached_property
    def port_digest(self) -> str:
        """Every engine source file a network and its export depend on: the slice, the shared
        modules it imports (e.g. the COCO stack), export and weights code."""
        return source_digest(self.spec.slice_module, *EXPORT_CODE)

    def backend_code_digest(self, backend: Backend, *more: str) -> str:
        return source_digest(self.spec.slice_module, *EXPORT_CODE, type(backend).__module__, *more)

    # -- weights and networks -------------------------------------------------------------------
    def weights(self, network: str, roots: Roots | None = None) -> WeightsChoice:
        roots = roots or self.ws.roots
        if self.ws.options.weights == "seeded":
            return self.seeded_weights()
        return WeightsChoice(find_checkpoint(self.spec, network, roots), self.ws.options.salt)

    def seeded_weights(self) -> WeightsChoice:
        return WeightsChoice(None, self.ws.options.salt)

    def network(
        self, network: str, variant: str | None = None, weights: WeightsChoice | None = None, source: str = "port"
    ) -> tuple[torch.nn.Module, str]:
        """The network in eval mode with weights applied, and the digest identifying those weights."""
        weights = weights or self.weights(network)
        variant = variant or self.spec.networks[network].default_variant
        key = (network, variant, weights, source)
        if key not in self._networks:
            if source == "port":
                module = self.slice.build_network(network, variant)
            else:
                module = self.slice.build_upstream_network(network, self.upstream_checkout(network))
            state_keys = self.spec.networks[network].checkpoint_keys
            digest = apply_weights(module, weights, self.slice, network, state_keys)
            self._networks[key] = (module.eval(), digest)
        return self._networks[key]

    def upstream_checkout(self, network: str) -> UpstreamCheckout:
        """The patched upstream tree ``network`` is built from (one per checkout and handle, so its
        isolated module table is shared by every network built from it); raises UpstreamNotStaged
        or UpstreamDependencyMissing."""
        source = self._upstream_source(network)
        if source.name not in self._upstream:
            self._upstream[source.name] = source.checkout(
                self.ws.roots.cache_dir, self.ws.roots.upstream_root, rebuild=self.ws.options.rebuild,
                run_id=self.ws.cache.run_id,
            )
        return self._upstream[source.name]

    def _upstream_source(self, network: str):
        source = upstream_source(self.spec, network)
        if source is None:
            raise UpstreamError(f"baselines/{self.spec.name}.yaml: no upstream checkout builds {network!r}")
        return source

    # -- cases ----------------------------------------------------------------------------------
    def feeds(self, case: Case, seed: int = 0) -> dict[str, np.ndarray]:
        return self.slice.example_inputs(self.spec, case.network, self.case_dims(case), seed)

    def case_for_feeds(self, network: str, feeds: Mapping[str, np.ndarray], backend: str) -> Case:
        """The case whose input shapes match ``feeds`` (used by accuracy passes on real data)."""
        net = self.spec.networks[network]
        dims: dict[str, int] = {}
        for spec_in in net.inputs:
            shape = feeds[spec_in.name].shape
            for template, actual in zip(spec_in.shape, shape):
                if isinstance(template, str):
                    dims[template] = int(actual)
        # Eager torch, the reference, runs the network's default variant (the deployed semantics),
        # not a variant that names torch for a golden of its own.
        deployed = BACKENDS[backend].deployed if backend in BACKENDS else True
        variant = next((v.name for v in net.variants if v.runs_on(backend)), net.variants[0].name) if deployed \
            else net.default_variant
        profile = "dims:" + ",".join(f"{k}={v}" for k, v in sorted(dims.items()) if k != "batch")
        exporter = (self.ws.options.exporters or (net.default_exporter,))[0]
        return Case(self.spec.name, network, profile, dims.get("batch", 1), exporter, variant, False)

    def case_dims(self, case: Case) -> dict[str, int]:
        if case.profile.startswith("dims:"):
            pairs = [p.split("=") for p in case.profile[5:].split(",") if p]
            return {**{k: int(v) for k, v in pairs}, "batch": case.batch}
        return self.spec.dims(case)

    def graph_flops(self, case: Case) -> GraphFlops:
        """FLOPs of one call of ``case``'s exported graph, for the roofline figures of throughput rows."""
        if case.id not in self._flops:
            dims = self.case_dims(case)
            shapes = {i.name: i.concrete_shape(dims) for i in self.spec.networks[case.network].inputs}
            self._flops[case.id] = graph_flops(self.onnx(case), shapes)
        return self._flops[case.id]

    # -- artifacts ------------------------------------------------------------------------------
    def onnx(
        self, case: Case, weights: WeightsChoice | None = None, source: str = "port", dynamic_dims: tuple[str, ...] = ()
    ) -> Path:
        """The exported ONNX for ``case``; ``dynamic_dims`` keeps those named dims symbolic (one
        graph for every value, traced at the case's)."""
        weights = weights or self.weights(case.network)
        module, weights_digest = self.network(case.network, case.variant, weights, source)
        net = self.spec.networks[case.network]
        trace_dims = self.case_dims(case)
        dims = {k: ("dynamic" if k in dynamic_dims else v) for k, v in trace_dims.items()}
        dynamic_axes = {
            spec_in.name: {axis: str(d) for axis, d in enumerate(spec_in.shape) if d in dynamic_dims}
            for spec_in in net.inputs
        }
        dynamic_axes = {name: axes for name, axes in dynamic_axes.items() if axes}
        opset = net.variant(case.variant).opset.get(case.exporter) or net.opset.get(case.exporter)
        if opset is None:
            raise KeyError(f"baselines/{self.spec.name}.yaml: no opset for exporter {case.exporter}")
        upstream = None if source == "port" else self._upstream_source(case.network)
        source_id = "port" if upstream is None else f"upstream:{upstream.commit}"
        key = ArtifactKey(
            kind="onnx",
            model=self.spec.name,
            network=case.network,
            name=f"{case.network}-{_dims_label(dims)}-{case.exporter}",
            fields={
                "source": source_id,
                "code": self.port_digest,
                "patches": patches_digest(upstream.patches_dir) if upstream else None,
                "weights": weights_digest,
                "dims": dims,
                "exporter": case.exporter,
                "opset": opset,
                "variant": case.variant,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
            },
        )
        feeds = self.slice.example_inputs(self.spec, case.network, trace_dims, 0)

        def build(staging: Path) -> None:
            export_onnx(
                module, feeds, net.output_names, staging / ONNX_FILE,
                exporter=case.exporter, opset=opset, dynamic_axes=dynamic_axes or None,
                extras=self.slice.export_extras(case.network, case.variant, case.exporter),
            )

        return self.ws.cache.get(key, build) / ONNX_FILE

    def compile_request(self, case: Case, weights: WeightsChoice | None = None) -> CompileRequest:
        weights = weights or self.weights(case.network)
        dims = self.case_dims(case)
        feeds = self.slice.example_inputs(self.spec, case.network, dims, 0)
        return CompileRequest(
            spec=self.spec,
            case=case,
            dims=dims,
            onnx_path=None,
            build_network=lambda: self.network(case.network, case.variant, weights)[0],
            example_feeds=feeds,
            expected_output_shapes=lambda: self._expected_output_shapes(case, weights),
        )

    def _expected_output_shapes(self, case: Case, weights: WeightsChoice) -> dict[str, tuple[int, ...]]:
        return {name: tuple(v.shape) for name, v in self.reference(case, weights).items()}

    def session(self, backend_name: str, case: Case, weights: WeightsChoice | None = None) -> Session:
        weights = weights or self.weights(case.network)
        key = (backend_name, case, weights)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        backend = self.ws.backend(backend_name)
        request = self.compile_request(case, weights)
        if backend.consumes == "onnx":
            request.onnx_path = self.onnx(case, weights, dynamic_dims=backend.dynamic_input_dims(request))
        if backend.needs_compile:
            _, weights_digest = self.network(case.network, case.variant, weights)
            dims = backend.artifact_dims(request)
            fields = {
                "weights": weights_digest,
                "code": self.backend_code_digest(backend),
                "dims": dims,
                "variant": case.variant,
                "versions": backend.versions(),
                "torch": torch.__version__,
            }
            settings = backend.artifact_settings(request)
            if settings:  # absent when empty, so backends without settings keep their keys
                fields["settings"] = settings
            # Named by what the artifact depends on, not by the case: cases that differ only in
            # the exporter share one build of a backend that compiles the torch network.
            name = f"{case.network}-{_dims_label(dims)}"
            if request.onnx_path is not None:
                fields["onnx_sha256"] = file_sha256(request.onnx_path)
                name += f"-{case.exporter}"
            key_ = ArtifactKey(backend.name, self.spec.name, case.network, name, fields)
            artifact: Any = self.ws.cache.get(key_, lambda staging: backend.compile(request, staging))
        elif backend.consumes == "torch":
            artifact = self.network(case.network, case.variant, weights)[0]
        else:
            artifact = request.onnx_path
        session = backend.load(artifact, request)
        self._sessions[key] = session
        while len(self._sessions) > OPEN_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def reference(self, case: Case, weights: WeightsChoice | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Torch eager outputs on the case's example inputs (computed once per process)."""
        weights = weights or self.weights(case.network)
        key = (case, weights, seed)
        if key not in self._references:
            module, _ = self.network(case.network, case.variant, weights)
            net = self.spec.networks[case.network]
            from tooling.backends.cpu import TorchSession

            feeds = self.slice.example_inputs(self.spec, case.network, self.case_dims(case), seed)
            self._references[key] = TorchSession(module, net.input_names, net.output_names).run(feeds)
        return self._references[key]

    def run_chain(self, chain_case: ChainCase, backend_name: str, served_by: str | None = None,
                  weights: WeightsChoice | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """The slice's chain on its example inputs, each member network on ``backend_name`` with the
        artifact variant ``served_by`` runs (default: the same backend; torch eager as the
        reference passes the deployed backend, so both run the same variant)."""
        chain = self.spec.chains[chain_case.chain]
        dims = {**self.spec.profiles[chain_case.profile].dims, "batch": chain_case.batch}
        exporters = self.ws.options.exporters

        def run(network: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            if network not in chain.networks:
                raise KeyError(f"chain {chain.name} runs {network!r}, which it does not list ({list(chain.networks)})")
            case = planning.chain_member(self.spec, chain_case, network, served_by or backend_name, exporters)
            if case is None:
                raise KeyError(f"{chain_case.id}: no {network} case runs on {served_by or backend_name}")
            return self.session(backend_name, case, weights).run(feeds)

        feeds = self.slice.chain_inputs(self.spec, chain.name, dims, seed)
        return self.slice.run_chain(chain.name, run, feeds)

    # -- accuracy -------------------------------------------------------------------------------
    def agreement_weights_root(self, answer: KnownAnswer) -> Path | None:
        """The weights root holding the slice's calibrated agreement checkpoints for ``answer``'s
        set at its profile's dims (built once per cache: the calibration runs torch eager on the
        set, at the sizes its agreement pass runs), or None where the
        slice scores it informatively on seeded weights."""
        if not self.slice.calibrates_agreement:
            return None
        samples = self.spec.accuracy.agreement_samples
        dims = self.spec.profiles[answer.profile].dims
        key = ArtifactKey(
            kind="calibrated", model=self.spec.name, network="all", name=f"agreement-{samples}",
            fields={"code": self.port_digest, "data": content_digest(answer.data_root), "samples": samples,
                    "dims": dims, "torch": torch.__version__},
        )
        return self.ws.cache.get(key, lambda staging: self.slice.calibrate_agreement(answer, samples, staging, dims))


def _versions(backend: Backend) -> dict[str, str]:
    try:
        return backend.versions()
    except Exception as exc:  # noqa: BLE001 - a tool that cannot say its version is described by that
        return {"error": f"{type(exc).__name__}: {exc}"}


def _read_probe(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet, or damaged: asked again
    return stored if isinstance(stored, dict) and {"inputs", "availability", "versions"} <= stored.keys() else None


def _dims_label(dims: Mapping[str, int | str]) -> str:
    """Readable part of an artifact's directory name: the dims' values in name order."""
    return "x".join(str(dims[k]) for k in sorted(dims))

