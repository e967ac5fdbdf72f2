"""CPU backends: torch eager (the reference), ONNX Runtime and OpenVINO."""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from filelock import FileLock

from tooling.backends.base import Arrays, Availability, Backend, BackendError, CompileRequest


class TorchSession:
    def __init__(self, network: torch.nn.Module, input_names: list[str], output_names: list[str]):
        self.network = network.eval()
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> Arrays:
        with torch.inference_mode():
            result = self.network(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        if isinstance(result, Mapping):
            values = [result[n] for n in self.output_names]
        elif isinstance(result, torch.Tensor):
            values = [result]
        else:
            values = list(result)
        return {n: v.detach().cpu().numpy() for n, v in zip(self.output_names, values)}


class TorchEagerBackend(Backend):
    name = "torch"
    deployed = False
    consumes = "torch"

    def load(self, artifact: torch.nn.Module, request: CompileRequest) -> TorchSession:
        net = request.spec.networks[request.case.network]
        return TorchSession(artifact, net.input_names, net.output_names)


class OrtSession:
    def __init__(self, path: Path, threads: int, optimize: bool | str, providers: list[str]):
        """``optimize``: True (all graph rewrites), False (none: the graph as written), or a level
        name from a model's ``backend_options`` (``all``, ``extended``, ``basic``, ``disabled``)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        level = {True: "all", False: "disabled"}.get(optimize, optimize)
        if level not in levels:
            raise BackendError(f"unknown onnxruntime graph optimisation level {level!r}; use {sorted(levels)}")
        options.graph_optimization_level = levels[level]
        # A spinning worker steals the other core from a parallel test or the timed backend.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception hierarchy
            raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> Arrays:
        values = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, values))


class PackageBackend(Backend):
    """A backend that is one pip package: here when it is installed; its version keys artifacts."""

    package: str = ""

    def availability(self) -> Availability:
        if importlib.util.find_spec(self.package) is None:
            return Availability(False, f"{self.package} is not installed (pip install {self.package})")
        return Availability(True)

    def versions(self) -> dict[str, str]:
        return {self.package: importlib.import_module(self.package).__version__}


class OnnxReferenceBackend(PackageBackend):
    """The ONNX graph as written, executed without graph rewrites: what "ONNX" means in a parity gate."""

    name = "onnx"
    deployed = False
    package = "onnxruntime"

    def load(self, artifact: Path, request: CompileRequest) -> OrtSession:
        return OrtSession(artifact, self.config.threads, optimize=False, providers=["CPUExecutionProvider"])


class OnnxRuntimeBackend(OnnxReferenceBackend):
    name = "onnxruntime"
    deployed = True

    def load(self, artifact: Path, request: CompileRequest) -> OrtSession:
        level = request.backend_options(self.name).get("graph_optimization", "all")
        return OrtSession(artifact, self.config.threads, optimize=level, providers=["CPUExecutionProvider"])


class OpenVinoSession:
    def __init__(self, path: Path, threads: int, expected_shapes: dict[str, tuple[int, ...]] | None,
                 cache_dir: Path | None = None):
        import openvino as ov

        core = ov.Core()
        cache_dir = _writable_dir(cache_dir)
        try:
            model = core.read_model(str(path))
            if cache_dir is None:
                self.compiled = self._compile(core, model, threads)
            else:
                # OpenVINO's model cache: a later process imports the compiled graph (keyed by the
                # model, these properties, the device and OpenVINO's version) instead of compiling
                # it again. It writes its blobs in place, so processes take turns under a lock.
                core.set_property({"CACHE_DIR": str(cache_dir)})
                with FileLock(str(cache_dir / ".lock")):
                    self.compiled = self._compile(core, model, threads)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses with the reason
            raise BackendError(f"openvino cannot compile {path}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.expected_shapes = expected_shapes or {}

    @staticmethod
    def _compile(core, model, threads: int):
        # Without the f32 hint OpenVINO runs bf16 on CPUs that have it (errors around 1e-2).
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})

    def run(self, feeds: Mapping[str, np.ndarray]) -> Arrays:
        result = self.request.infer(dict(feeds))
        outputs = {name: np.array(result[port]) for name, port in zip(self.output_names, self.compiled.outputs)}
        # OpenVINO has been seen to return wrongly shaped outputs without an error; never pass one on.
        for name, shape in self.expected_shapes.items():
            if name in outputs and tuple(outputs[name].shape) != tuple(shape):
                raise BackendError(f"openvino returned {name} with shape {outputs[name].shape}, expected {shape}")
        return outputs


class OpenVinoBackend(PackageBackend):
    name = "openvino"
    package = "openvino"

    def load(self, artifact: Path, request: CompileRequest) -> OpenVinoSession:
        cache = self.config.runtime_cache
        return OpenVinoSession(artifact, self.config.threads, request.expected_output_shapes(),
                               cache / self.name if cache is not None else None)


def _writable_dir(path: Path | None) -> Path | None:
    """``path``, created if need be, or None where it cannot be written (a read-only cache)."""
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None
