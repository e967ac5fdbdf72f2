"""Compiled PyTorch: an AOTInductor package built from the torch network, on the CPU or a GPU.

The network is captured with ``torch.export`` at the case's static shapes and compiled ahead of
time into a ``.pt2`` package (generated C++/Triton kernels plus the weights) that
``aoti_load_package`` runs without Python-level tracing. The package goes through the shared
artifact cache like an OM file, so every worker and every later run reuses one compile.
"""
from __future__ import annotations

import atexit
import copy
import hashlib
import os
import platform
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tooling.backends.base import Availability, Backend, BackendError, CompileRequest
from tooling.backends.cpu import TorchSession
from tooling.backends.gpu import CudaBackend, CudaTimedSession, cuda_device, keep_fp32_on_cuda

PACKAGE = "model.pt2"
# Freezing turns the weights into constants, which lets Inductor fold BatchNorm into the
# convolutions and pre-pack their weights: a deployed artifact has fixed weights, and without it
# the package calls the same convolution kernels as eager and is no faster.
INDUCTOR_CONFIGS = {"freezing": True}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AotiSession(TorchSession):
    def __init__(self, runner, input_names: list[str], output_names: list[str]):
        # A compiled package has no train/eval mode to set, unlike the module TorchSession expects.
        self.network = runner
        self.input_names = input_names
        self.output_names = output_names
        _open_runners.add(self)

    def close(self) -> None:
        """Let the package's loader go: it removes the copy of the package it extracted to TMPDIR."""
        self.network = None


# The loader extracts each package into TMPDIR/aotinductor_XXXXXX and removes that copy only when
# it is destroyed; a runner still held by a cache when the interpreter shuts down is never
# destroyed, so every pytest run left one extracted package (50-70 MB) behind in /tmp.
_open_runners: weakref.WeakSet[AotiSession] = weakref.WeakSet()


@atexit.register
def _close_open_runners() -> None:
    for session in list(_open_runners):
        session.close()


class AotiBackend(Backend):
    name = "aoti"
    consumes = "torch"
    needs_compile = True
    timing_scope = "host wall time per call on the CPU (numpy in, numpy out)"

    def availability(self) -> Availability:
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - Inductor raises a bare RuntimeError when none is found
            return Availability(False, f"AOTInductor needs a C++ compiler (g++ or clang++): {_first_line(exc)}")
        return Availability(True)

    def versions(self) -> dict[str, str]:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        # The kernels are generated for the build host's vector ISA: a package from an AVX-512
        # host would crash on an AVX2 one sharing the cache.
        isa = str(pick_vec_isa()) or "none"
        return {"torch": torch.__version__, "inductor": repr(INDUCTOR_CONFIGS), "cpu_isa": isa}

    def probe_inputs(self) -> dict[str, Any] | None:
        # What Inductor's compiler search (CXX, else g++, run with --version) and its vector-ISA
        # pick (CPU flags, ATEN_CPU_CAPABILITY) read, and the torch that does it.
        compiler = os.environ.get("CXX", "g++")
        found = shutil.which(compiler)
        stat = os.stat(found) if found else None
        flags = next((line.split(":", 1)[1].split() for line in _cpuinfo().splitlines()
                      if line.startswith(("flags", "Features"))), [])
        return {
            "torch": torch.__version__, "inductor": repr(INDUCTOR_CONFIGS), "machine": platform.machine(),
            "compiler": [compiler, found, stat.st_size if stat else None, stat.st_mtime_ns if stat else None],
            "cpu_flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            # Importing Inductor sets TORCHINDUCTOR_CACHE_DIR in its own process (where its compile
            # cache is, not what it finds or picks): left out, or a process that compiled would
            # never match one that did not.
            "environment": {k: v for k, v in sorted(os.environ.items())
                            if k in ("CXX", "ATEN_CPU_CAPABILITY", "TORCH_INDUCTOR_INSTALL_GXX")
                            or (k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR")},
        }

    def target(self) -> torch.device:
        return torch.device("cpu")

    def compile(self, request: CompileRequest, staging: Path) -> None:
        device = self.target()
        net = request.spec.networks[request.case.network]
        network = request.build_network()
        if device.type == "cuda":
            keep_fp32_on_cuda()  # Inductor reads the TF32 switches while it generates kernels
            network = copy.deepcopy(network).to(device)  # the CPU reference shares the original
        feeds = request.example_feeds
        args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in net.input_names)
        what = f"{request.case.id} ({device})"
        try:
            program = torch.export.export(network.eval(), args)
        except Exception as exc:  # noqa: BLE001 - export raises many unrelated types; the message is what matters
            raise BackendError(f"torch.export cannot capture {what}: {_first_line(exc)}") from exc
        try:
            # A copy: Inductor writes its own settings into the dict it is given.
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(staging / PACKAGE), inductor_configs=dict(INDUCTOR_CONFIGS)
            )
        except Exception as exc:  # noqa: BLE001 - Inductor's lowering and C++ build errors share no base class
            raise BackendError(f"AOTInductor cannot compile {what}: {_first_line(exc)}") from exc

    def load(self, artifact: Path, request: CompileRequest) -> TorchSession:
        net = request.spec.networks[request.case.network]
        runner = torch._inductor.aoti_load_package(str(Path(artifact) / PACKAGE))
        return AotiSession(runner, net.input_names, net.output_names)


class AotiCudaBackend(CudaBackend, AotiBackend):
    name = "aoti-cuda"

    def probe_inputs(self) -> None:
        return None  # a GPU's state is not read cheaply: asked every process

    def availability(self) -> Availability:
        cuda = CudaBackend.availability(self)
        return cuda if not cuda.ok else AotiBackend.availability(self)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "inductor": repr(INDUCTOR_CONFIGS), **CudaBackend.versions(self)}

    def target(self) -> torch.device:
        return cuda_device(self.config.device_index)

    def load(self, artifact: Path, request: CompileRequest) -> CudaTimedSession:
        keep_fp32_on_cuda()
        device = self.target()
        net = request.spec.networks[request.case.network]
        runner = torch._inductor.aoti_load_package(str(Path(artifact) / PACKAGE), device_index=device.index)
        return CudaTimedSession(runner, device, net.input_names, net.output_names)
