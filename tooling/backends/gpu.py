"""CUDA targets: torch eager on the GPU (the reference rate) and ONNX Runtime's CUDA and TensorRT
execution providers. All of them are probed, never required: on a CPU-only host they report why
they are unavailable and their tests skip.

Parity gates compare every target with the float32 ONNX graph run on the CPU. TF32 convolutions
(cuDNN's default on Ampere and later) differ from it by about 1e-3, more than the fp32 tolerances
allow, so the torch sessions here switch TF32 off; what they measure is the float32 model.
"""
from __future__ import annotations

import copy
import re
import shutil
from typing import Mapping

import numpy as np
import torch

from tooling.backends.base import Arrays, Availability, Backend, BackendError, CompileRequest
from tooling.backends.cpu import OnnxRuntimeBackend, OrtSession
from tooling.tools import ToolTimeout, run_tool

# Words in a CUDA device name that say who made it or how it is packaged, not what it is.
_NOT_THE_MODEL = re.compile(r"^(NVIDIA|Tesla|GeForce|Quadro|PCIe|SXM\d*|NVL|HBM\d*e?|\d+GB|MIG.*)$", re.IGNORECASE)


def cuda_device_class(device_name: str) -> str:
    """The device class floors are keyed by: "NVIDIA H100 80GB HBM3" -> "H100", "Tesla T4" -> "T4"."""
    words = [w for w in re.split(r"[\s\-]+", device_name.strip()) if w]
    kept: list[str] = []
    for word in words:
        if _NOT_THE_MODEL.match(word):
            if kept:
                break  # what follows the model name is packaging (memory size, form factor)
            continue
        kept.append(word)
    return " ".join(kept) or device_name.strip()


def gpu_name(index: int) -> str:
    """The CUDA device's marketing name, from torch when it has CUDA, else from nvidia-smi (the
    pinned torch is a CPU build, and onnxruntime-gpu works without torch's CUDA)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(index)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise BackendError("cannot name the GPU: torch has no CUDA and nvidia-smi is not on PATH")
    try:
        done = run_tool([exe, "--query-gpu=name", "--format=csv,noheader", "-i", str(index)], timeout_s=30)
    except ToolTimeout as exc:
        raise BackendError(str(exc)) from exc
    if done.returncode != 0 or not done.stdout.strip():
        raise BackendError(f"nvidia-smi cannot name GPU {index}: {(done.stdout + done.stderr).strip()}")
    return done.stdout.strip().splitlines()[0]


def cuda_unavailable_reason() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device visible (driver missing or CUDA_VISIBLE_DEVICES empty)"
    return ""


def cuda_device(index: int) -> torch.device:
    if index >= torch.cuda.device_count():
        raise BackendError(f"CUDA device {index} requested; this host has {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def keep_fp32_on_cuda() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class CudaTimedSession:
    """Runs a callable on CUDA tensors and times only the device work between two CUDA events.

    Inputs are copied to the device before the start event and outputs back after the end event,
    so ``device_times_ms`` holds compute time, the figure comparable with the guides' NPU and T4
    columns; the event is synchronised before the call returns.
    """

    def __init__(self, run, device: torch.device, input_names: list[str], output_names: list[str]):
        self._run = run
        self.device = device
        self.input_names = input_names
        self.output_names = output_names
        self._times_ms: list[float] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> Arrays:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode(), torch.cuda.device(self.device):
            start.record()
            result = self._run(*args)
            end.record()
            end.synchronize()
        self._times_ms.append(start.elapsed_time(end))
        if isinstance(result, Mapping):
            values = [result[n] for n in self.output_names]
        else:
            values = [result] if isinstance(result, torch.Tensor) else list(result)
        return {n: v.detach().cpu().numpy() for n, v in zip(self.output_names, values)}

    def device_times_ms(self) -> list[float]:
        return list(self._times_ms)


class CudaBackend(Backend):
    marker = "gpu"
    timing_scope = "CUDA compute only (events around the call; host-device copies excluded)"

    def availability(self) -> Availability:
        reason = cuda_unavailable_reason()
        if not reason:
            index, count = self.config.device_index, torch.cuda.device_count()
            reason = f"no CUDA device {index} (this host has {count})" if index >= count else ""
        return Availability(not reason, reason)

    def device_class(self) -> str:
        return cuda_device_class(gpu_name(self.config.device_index))

    def versions(self) -> dict[str, str]:
        device = cuda_device(self.config.device_index)
        major, minor = torch.cuda.get_device_capability(device)
        return {"cuda": str(torch.version.cuda), "device": self.device_class(), "capability": f"sm_{major}{minor}"}


class TorchCudaBackend(CudaBackend):
    """Torch eager on the GPU: the rate a compiled GPU artifact should beat."""

    name = "torch-cuda"
    deployed = False
    consumes = "torch"

    def load(self, artifact: torch.nn.Module, request: CompileRequest) -> CudaTimedSession:
        keep_fp32_on_cuda()
        device = cuda_device(self.config.device_index)
        # The network object is shared with the CPU reference: move a copy.
        network = copy.deepcopy(artifact).eval().to(device)
        net = request.spec.networks[request.case.network]
        return CudaTimedSession(network, device, net.input_names, net.output_names)


class OrtGpuBackend(OnnxRuntimeBackend):
    """ONNX Runtime with a GPU execution provider (CPU fallback for unsupported nodes)."""

    marker = "gpu"
    timing_scope = "host wall time per call including host-device copies (ORT runs synchronously)"
    providers: tuple[str, ...] = ()  # in preference order; the first must be the one that runs

    def availability(self) -> Availability:
        base = super().availability()
        if not base.ok:
            return base
        import onnxruntime

        installed = onnxruntime.get_available_providers()
        if self.providers[0] not in installed:
            return Availability(
                False, f"onnxruntime {onnxruntime.__version__} has no {self.providers[0]} "
                f"(providers: {', '.join(installed)}; pip install onnxruntime-gpu)",
            )
        return Availability(True)

    def device_class(self) -> str:
        return cuda_device_class(gpu_name(self.config.device_index))

    def load(self, artifact, request: CompileRequest) -> OrtSession:
        options = {"device_id": self.config.device_index}
        providers = [(p, options) for p in self.providers] + ["CPUExecutionProvider"]
        session = OrtSession(artifact, self.config.threads, optimize=True, providers=providers)
        # ORT falls back to the CPU silently when a provider fails to initialise.
        active = session.session.get_providers()
        if self.providers[0] not in active:
            raise BackendError(f"{self.providers[0]} did not initialise for {artifact} (active: {active})")
        return session


class OrtCudaBackend(OrtGpuBackend):
    name = "onnxruntime-cuda"
    providers = ("CUDAExecutionProvider",)


class OrtTensorRtBackend(OrtGpuBackend):
    name = "onnxruntime-trt"
    # Nodes TensorRT rejects run on the CUDA provider rather than the CPU.
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
