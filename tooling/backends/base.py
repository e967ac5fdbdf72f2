"""The backend interface: probe, optional compile step, load, run.

A backend turns an artifact into a ``Session`` whose ``run(feeds)`` maps input names to arrays and
returns output names to arrays. Backends that need a compile step (ATC for OM, AOTInductor) build
their artifact from the exported ONNX or the torch network through the shared artifact cache, so
the same code path (build, cache, load, parity, benchmark) serves every deployed target.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from tooling.model_spec import Case, ModelSpec

Arrays = dict[str, np.ndarray]


class BackendError(RuntimeError):
    """A backend failed to compile, load or run an artifact."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    selected: bool = True  # False: the run left it out (--backends), whatever this host has

    def describe(self, backend: str) -> str:
        """Why ``backend`` does not run, as skips, failures and the CLI say it."""
        return f"{backend} unavailable: {self.reason}" if self.selected else f"{backend} not selected: {self.reason}"


class Session(Protocol):
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> Arrays: ...


@dataclass
class BackendConfig:
    threads: int = 1
    device: str | None = None  # an NPU or GPU id for backends that select one
    # Where a runtime may keep its own compile cache (OpenVINO's model cache), shared by the
    # processes of a run and later runs; None: compiled afresh in every process.
    runtime_cache: Path | None = None

    @property
    def device_index(self) -> int:
        return int(self.device) if self.device else 0


@dataclass
class CompileRequest:
    """Everything a compile step may need; each backend reads the parts it uses."""

    spec: "ModelSpec"
    case: "Case"
    dims: dict[str, int]
    onnx_path: Path | None
    build_network: Callable[[], "torch.nn.Module"]
    example_feeds: Arrays
    # Output shapes of the torch reference on example_feeds; computed only for backends that
    # check them (some runtimes return wrongly shaped outputs without an error).
    expected_output_shapes: Callable[[], dict[str, tuple[int, ...]]] = lambda: {}
    # The graph's outputs in order where they are not the network's (the triage's graph with its
    # intermediates exposed), for runtimes that return outputs by position.
    output_names: tuple[str, ...] | None = None

    def backend_options(self, backend: str) -> dict[str, Any]:
        """The model's ``backend_options.<backend>`` from its yaml (tuning that is data, not code)."""
        return dict(self.spec.raw.get("backend_options", {}).get(backend, {}))


class Backend:
    name: str = ""
    deployed: bool = True  # False for references (torch eager, ONNX reference)
    consumes: str = "onnx"  # "onnx": loads the exported file; "torch": runs/compiles the network
    needs_compile: bool = False
    marker: str | None = None  # "npu" / "gpu": tests on this backend also carry that marker
    timing_scope: str = "host wall time per call, inputs already on the device"

    def __init__(self, config: BackendConfig | None = None):
        self.config = config or BackendConfig()

    def availability(self) -> Availability:
        return Availability(True)

    def device_class(self) -> str:
        return "cpu"

    def versions(self) -> dict[str, str]:
        """Tool versions that change a compiled artifact's bytes (part of its cache key)."""
        return {}

    def probe_inputs(self) -> dict[str, Any] | None:
        """Where asking ``availability`` and ``versions`` is slow (AOTInductor imports Inductor and
        compiles its ISA checks: seconds in every process), what the answers depend on, read
        cheaply: the workspace keeps the answers in the cache under these inputs
        (``Workspace.probe``). None: asked every process."""
        return None

    @classmethod
    def serves(cls, spec: "ModelSpec", case: "Case") -> bool:
        """Whether this backend's artifact can take the case's shape at all (an ATC OM built for
        fixed --dynamic_dims gears cannot); a case it cannot serve is not parametrized for it."""
        return True

    @classmethod
    def tolerance_key(cls, spec: "ModelSpec", network: str) -> str:
        """Which ``backend_tolerances`` entry holds this backend's tolerances: its name, or
        ``name@setting`` where a compile setting (ATC's precision mode) changes the numbers."""
        return cls.name

    def artifact_settings(self, request: CompileRequest) -> dict[str, Any]:
        """The model's compile settings that change the artifact's bytes (part of its cache key)."""
        return {}

    def artifact_dims(self, request: CompileRequest) -> dict[str, int]:
        """The case dims a compiled artifact depends on (its cache key); a backend whose artifact
        serves several shapes (ATC dynamic dims) leaves those out, so they share one build."""
        return dict(request.dims)

    def dynamic_input_dims(self, request: CompileRequest) -> tuple[str, ...]:
        """Named dims the exported ONNX must keep symbolic for this backend's compiler (ATC's
        dynamic dims take a graph whose H and W are free); empty: the case's static shape."""
        return ()

    def compile(self, request: CompileRequest, staging: Path) -> None:
        raise NotImplementedError(f"{self.name} has no compile step")

    def load(self, artifact: Any, request: CompileRequest) -> Session:
        raise NotImplementedError


def worker_device(devices: str | None, worker_id: str | None) -> str | None:
    """The device id (NPU or GPU) for one pytest process out of a comma-separated list.

    xdist worker ``gwN`` takes the N-th id modulo the list's length, so ``-n`` equal to the number
    of devices pins one worker per device; the controller (no xdist, ``-n 0``) takes the first.
    """
    if not devices:
        return None
    ids = [d.strip() for d in devices.split(",")]
    if any(not d.isdigit() for d in ids):
        raise ValueError(f"device ids must be comma-separated integers, got {devices!r}")
    if not worker_id or not worker_id.startswith("gw"):
        return ids[0]
    return ids[int(worker_id[2:]) % len(ids)]
