"""The backend registry: name -> class, every backend the suite knows."""
from __future__ import annotations

from tooling.backends.aoti import AotiBackend, AotiCudaBackend
from tooling.backends.base import Backend
from tooling.backends.cpu import OnnxReferenceBackend, OnnxRuntimeBackend, OpenVinoBackend, TorchEagerBackend
from tooling.backends.gpu import OrtCudaBackend, OrtTensorRtBackend, TorchCudaBackend
from tooling.backends.om import OmBackend

# The order in which each gate is parametrized over backends (so the order its rows run in).
BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls
    for cls in (
        TorchEagerBackend, OnnxReferenceBackend, OnnxRuntimeBackend, OpenVinoBackend, AotiBackend,
        TorchCudaBackend, AotiCudaBackend, OrtCudaBackend, OrtTensorRtBackend, OmBackend,
    )
}
