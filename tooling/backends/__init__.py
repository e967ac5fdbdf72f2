"""Backend registry: name -> class. New targets (OM, compiled torch, GPU) register here."""
from __future__ import annotations

from tooling.backends.base import Availability, Backend, BackendConfig, BackendError, CompileRequest, Session
from tooling.backends.cpu import OnnxReferenceBackend, OnnxRuntimeBackend, OpenVinoBackend, TorchEagerBackend

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (TorchEagerBackend, OnnxReferenceBackend, OnnxRuntimeBackend, OpenVinoBackend)
}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def deployed_backend_names() -> list[str]:
    return [name for name, cls in BACKENDS.items() if cls.deployed]


__all__ = [
    "Availability", "Backend", "BackendConfig", "BackendError", "CompileRequest", "Session",
    "BACKENDS", "register", "deployed_backend_names",
]
