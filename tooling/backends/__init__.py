"""Backend registry: name -> class, and which device an xdist worker uses."""
from __future__ import annotations

from tooling.backends.aoti import AotiBackend, AotiCudaBackend
from tooling.backends.base import Availability, Backend, BackendConfig, BackendError, CompileRequest, Session
from tooling.backends.cpu import OnnxReferenceBackend, OnnxRuntimeBackend, OpenVinoBackend, TorchEagerBackend
from tooling.backends.gpu import OrtCudaBackend, OrtTensorRtBackend, TorchCudaBackend
from tooling.backends.om import OmBackend

# Order matters where a run compares backends: torch eager is timed first, so the deployed
# backends' speed-ups over it can be computed in the same session.
BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls
    for cls in (
        TorchEagerBackend, OnnxReferenceBackend, OnnxRuntimeBackend, OpenVinoBackend, AotiBackend,
        TorchCudaBackend, AotiCudaBackend, OrtCudaBackend, OrtTensorRtBackend, OmBackend,
    )
}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def deployed_backend_names() -> list[str]:
    return [name for name, cls in BACKENDS.items() if cls.deployed]


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


__all__ = [
    "Availability", "Backend", "BackendConfig", "BackendError", "CompileRequest", "Session",
    "BACKENDS", "register", "deployed_backend_names", "worker_device",
]
