"""The backend registry: name -> class, every backend the suite knows."""
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


__all__ = [
    "Availability", "Backend", "BackendConfig", "BackendError", "CompileRequest", "Session",
    "BACKENDS",
]
