"""The network-in-the-loop agreement check behind the ``accuracy-agreement`` gate.

The known-answer set is scored twice without any oracle: by the torch eager pipeline (the
reference) and by a deployed backend. Every network call of the deployed pass is compared with
torch eager on the same feeds (raw and decoded tolerances), and each metric the yaml's
``accuracy.agreement`` names may move at most its bound. Where the slice calibrates its agreement
weights (``ModelSlice.calibrate_agreement``), both passes run those checkpoints, so the metrics sit
strictly between their worst and best values and a deployed backend that moves the network's
outputs moves them; otherwise they run seeded weights.

The torch eager pass and its per-call outputs are computed once per set (the plugin's
``agreement_references`` fixture keeps one set per model and process), shared by every backend's
row and by the probes that perturb a deployed graph.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from tooling import planning
from tooling.accuracy import run_accuracy
from tooling.compare import ComparisonError, assert_outputs_match, compare_outputs
from tooling.locations import find_checkpoint
from tooling.slice import KnownAnswer
from tooling.weights import WeightsChoice
from tooling.workspace import ModelHandle, Workspace

# How many per-call disagreements a failure message lists (after every metric that moved).
SHOWN_CALL_PROBLEMS = 8


@dataclass
class AgreementResult:
    backend: str
    reference: dict[str, float]  # the torch eager pipeline's metrics
    metrics: dict[str, float]  # the deployed backend's
    deltas: dict[str, float]  # |deployed - reference| per gated metric
    metric_problems: list[str]  # gated metrics that moved further than their bound
    call_problems: list[str] = field(default_factory=list)  # network calls outside raw/decoded tolerances
    bounds: dict[str, float] = field(default_factory=dict)  # per gated metric, how far it may move here
    calls: int = 0
    worst: dict[str, float] = field(default_factory=dict)  # worst |difference| per compared output
    # The call that deviated most from torch eager relative to its tolerance (what a picture shows).
    largest: dict = field(default_factory=lambda: {"deviation": -1.0})

    def failure(self) -> str | None:
        """The gate's failure message (None: agreed): moved metrics first, by name, then calls."""
        if not self.calls:
            return f"the agreement set ran no network call on {self.backend}"
        if not self.metric_problems and not self.call_problems:
            return None
        lines = []
        if self.metric_problems:
            lines.append(f"metric moved on {self.backend}: " + "; ".join(self.metric_problems))
        if self.call_problems:
            lines.append(f"{len(self.call_problems)} network call disagreement(s) over {self.calls} calls:")
            lines += self.call_problems[:SHOWN_CALL_PROBLEMS]
        return "\n".join(lines)


def metric_problems(reference: Mapping[str, float], metrics: Mapping[str, float], bounds: Mapping[str, float],
                    backend: str) -> tuple[dict[str, float], list[str]]:
    """Per gated metric, how far ``backend`` moved it from torch eager, and each move past its bound."""
    deltas = {name: abs(metrics[name] - reference[name]) for name in bounds}
    problems = [
        f"{name}: {metrics[name]:.6g} on {backend} vs {reference[name]:.6g} on torch eager "
        f"(moved {deltas[name]:.3g} > {bound:g})"
        for name, bound in bounds.items() if not deltas[name] <= bound
    ]
    return deltas, problems


def _feeds_key(network: str, feeds: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.blake2b(network.encode(), digest_size=16)
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        h.update(f"{name}{value.shape}{value.dtype}".encode())
        h.update(value.tobytes())
    return h.digest()


class AgreementSet:
    """One model's known-answer set prepared for agreement runs, with its torch eager reference."""

    def __init__(self, zoo: Workspace, model: str, answer: KnownAnswer):
        base = zoo.model(model)
        self.answer = answer
        self.weights_root = base.agreement_weights_root(answer)
        self.handle: ModelHandle = zoo.with_roots(data_root=answer.data_root,
                                                  weights_root=self.weights_root).model(model)
        self.spec = self.handle.spec
        self._torch_outputs: dict[bytes, dict[str, np.ndarray]] = {}
        self._reference: dict[str, float] | None = None

    def probe(self) -> "AgreementSet":
        """The same set and torch eager reference with a handle of its own, so that a probe may
        swap the graphs its deployed sessions load without touching the gate's sessions. The
        handle shares the torch networks and references already built (DEKR's takes seconds to
        build) and opens sessions of its own."""
        probe = copy.copy(self)
        probe.handle = self.handle.with_own_sessions()
        return probe

    @property
    def weights_label(self) -> str:
        return f"calibrated checkpoints under {self.weights_root}" if self.weights_root else "seeded weights"

    def weights(self, network: str) -> WeightsChoice:
        if self.weights_root is None:
            return self.handle.seeded_weights()
        return WeightsChoice(find_checkpoint(self.spec, network, self.handle.ws.roots))

    def torch_outputs(self, network: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Torch eager outputs of ``network`` on ``feeds`` (each distinct call computed once)."""
        key = _feeds_key(network, feeds)
        if key not in self._torch_outputs:
            case = self.handle.case_for_feeds(network, feeds, "torch")
            self._torch_outputs[key] = self.handle.session("torch", case, self.weights(network)).run(feeds)
        return self._torch_outputs[key]

    def _score(self, backend: str, run_dir: Path, observe=None) -> dict[str, float]:
        return run_accuracy(
            self.handle, backend, profile=self.answer.profile, seeded=self.weights_root is None, observe=observe,
            run_dir=run_dir, label=f"{self.spec.name} agreement set on {backend}",
            limit=self.spec.accuracy.agreement_samples,
        )

    def reference(self, run_dir: Path) -> dict[str, float]:
        """The torch eager pipeline's metrics (its calls' outputs are kept for the deployed passes)."""
        if self._reference is None:
            self._reference = self._score("torch", run_dir / "run-torch",
                                          observe=lambda network, feeds, outputs: self._torch_outputs.setdefault(
                                              _feeds_key(network, feeds), {k: np.array(v) for k, v in outputs.items()}))
        return self._reference

    def run(self, zoo: Workspace, backend: str, run_dir: Path, compare_calls: bool = True) -> AgreementResult:
        """Score the set on ``backend`` against the torch eager reference; ``compare_calls`` also
        holds every network call to torch eager within the raw and decoded tolerances."""
        reference = self.reference(run_dir)
        spec, handle = self.spec, self.handle
        result = AgreementResult(backend, reference, {}, {}, [])

        def against_torch(network: str, feeds, outputs) -> None:
            net = spec.networks[network]
            expected = self.torch_outputs(network, feeds)
            case = handle.case_for_feeds(network, feeds, "torch")
            where = f"call {result.calls} ({network}, {case.profile}, b{case.batch})"
            result.calls += 1
            if not compare_calls:
                return
            checks = [(planning.tolerances(spec, network, backend), outputs, expected, "raw")]  # om@<precision>, say
            if net.decoded:
                decoded = planning.tolerances(spec, network, backend, decoded=True)
                checks.append((decoded, handle.slice.decode(network, feeds, outputs),
                               handle.slice.decode(network, feeds, expected), "decoded"))
            deviation = max((s.max_abs / s.atol if s.atol > 0 else s.max_abs)
                            for s in compare_outputs(outputs, expected, checks[0][0]))
            if deviation >= result.largest["deviation"]:
                result.largest.update(deviation=deviation, network=network, where=where, feeds=dict(feeds),
                                      reference=expected, actual=dict(outputs))
            for tolerances, actual, wanted, kind in checks:
                try:
                    stats = assert_outputs_match(actual, wanted, tolerances, f"{where} {kind}")
                except ComparisonError as exc:
                    result.call_problems.append(str(exc))
                    continue
                for s in stats:
                    result.worst[f"{kind}:{s.name}"] = max(result.worst.get(f"{kind}:{s.name}", 0.0), s.max_abs)

        result.metrics = self._score(backend, run_dir / f"run-{backend}", observe=against_torch)
        result.bounds = planning.agreement_bounds(spec, backend)
        result.deltas, result.metric_problems = metric_problems(reference, result.metrics, result.bounds, backend)
        return result


def perturb_initializer(source: Path, target: Path, which: str | tuple[int, ...], relative: float,
                        seed: int = 0) -> float:
    """Copy the ONNX graph ``source`` to ``target`` with one initializer multiplied elementwise by
    (1 + relative * N(0, 1)) (seeded); returns the relative L2 change made. ``which`` is its name,
    or its shape where the exporter renamed it (a convolution folded with its batch norm) and that
    shape is unique. No match, or several, is an error listing the named initializers."""
    model = onnx.load(str(source))
    if isinstance(which, str):
        found = [t for t in model.graph.initializer if t.name == which]
    else:
        found = [t for t in model.graph.initializer if tuple(t.dims) == tuple(which)]
    if len(found) != 1:
        names = sorted(t.name for t in model.graph.initializer if not t.name.startswith("onnx::"))
        raise KeyError(f"{source}: {len(found)} initializers match {which!r}; named ones: {names[:40]}")
    values = numpy_helper.to_array(found[0])
    noise = np.random.default_rng(seed).standard_normal(values.shape)
    changed = (values * (1.0 + relative * noise)).astype(values.dtype)
    found[0].CopyFrom(numpy_helper.from_array(changed, found[0].name))
    onnx.save(model, str(target))
    return float(np.linalg.norm(changed - values) / max(np.linalg.norm(values), 1e-30))
