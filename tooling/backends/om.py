"""Ascend OM: the exported ONNX compiled by ATC (tooling/backends/atc.py, after the rewrites of
tooling/backends/onnx_rewrites.py), run through ais_bench's Python ``InferSession``
(tooling/backends/om_session.py). The ``om:`` section of a baseline is described by ``OM`` in
tooling/schema.py."""
from __future__ import annotations

import importlib
import shlex
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from tooling.backends.atc import ATC_RECORD, OmSettings, atc_command, declares_om, run_atc, toolkit_version
from tooling.backends.base import Availability, Backend, BackendError, CompileRequest
from tooling.backends.npu import NpuChip, chip_for_device, probe_npus
from tooling.backends.om_session import OmSession
from tooling.backends.onnx_rewrites import apply_onnx_rewrites
from tooling.model_spec import ModelSpec


class OmBackend(Backend):
    name = "om"
    marker = "npu"
    needs_compile = True
    timing_scope = "NPU compute time per call as ais_bench measures it (host-device copies excluded)"

    @cached_property
    def _npus(self) -> tuple[list[NpuChip], str]:
        return probe_npus()

    def chip(self) -> NpuChip:
        chips, reason = self._npus
        if not chips:
            raise BackendError(f"no NPU: {reason}")
        return chip_for_device(chips, self.config.device_index)

    def availability(self) -> Availability:
        missing = []
        if shutil.which("atc") is None:
            missing.append("atc not on PATH (source /usr/local/Ascend/ascend-toolkit/set_env.sh)")
        try:
            importlib.import_module("ais_bench.infer.interface")
        except Exception as exc:  # noqa: BLE001 - a broken aclruntime raises OSError or RuntimeError on import
            missing.append(f"the ais_bench package cannot be imported ({type(exc).__name__}: {exc})")
        chips, reason = self._npus
        if not chips:
            missing.append(reason)
        elif self.config.device_index not in {c.device for c in chips}:
            listed = sorted(c.device for c in chips)
            missing.append(f"no NPU device {self.config.device_index} (npu-smi lists {listed})")
        return Availability(not missing, "; ".join(missing))

    def device_class(self) -> str:
        return self.chip().name

    def versions(self) -> dict[str, str]:
        atc = shutil.which("atc")
        return {"soc_version": self.chip().soc_version, "cann": toolkit_version(atc) if atc else "none"}

    @classmethod
    def serves(cls, spec: ModelSpec, case) -> bool:
        if not declares_om(spec, case.network):
            return True  # no om: section: compile says so, with the yaml's path
        dynamic = OmSettings.of(spec, case.network).dynamic_dims
        return dynamic is None or dynamic.serves(spec.dims(case))

    @classmethod
    def tolerance_key(cls, spec: ModelSpec, network: str) -> str:
        if not declares_om(spec, network):
            return cls.name
        return f"{cls.name}@{OmSettings.of(spec, network).precision_mode}"

    def artifact_settings(self, request: CompileRequest) -> dict[str, Any]:
        return OmSettings.of(request.spec, request.case.network).key_fields()

    def artifact_dims(self, request: CompileRequest) -> dict[str, int]:
        # One OM serves every --dynamic_dims bucket: the bucket dims do not identify it.
        dynamic = OmSettings.of(request.spec, request.case.network).dynamic_dims
        return {k: v for k, v in request.dims.items() if not dynamic or k not in dynamic.dims}

    def dynamic_input_dims(self, request: CompileRequest) -> tuple[str, ...]:
        dynamic = OmSettings.of(request.spec, request.case.network).dynamic_dims
        return tuple(dynamic.dims) if dynamic else ()

    def compile(self, request: CompileRequest, staging: Path) -> None:
        atc = shutil.which("atc")
        if atc is None:
            raise BackendError("atc not on PATH (source /usr/local/Ascend/ascend-toolkit/set_env.sh)")
        if request.onnx_path is None:
            raise BackendError("the OM backend compiles the exported ONNX, and the request has none")
        settings = OmSettings.of(request.spec, request.case.network)
        request.spec.load_slice()  # a slice registers its own ONNX rewrites on import
        for f in settings.files.values():
            (staging / f.name).write_text(f.content)
        # ATC drops fusion_result.json and kernel_meta/ into its working directory: keep them out
        # of the artifact.
        with tempfile.TemporaryDirectory(prefix="atc-", dir=staging.parent) as scratch:
            model = apply_onnx_rewrites(request.onnx_path, settings.onnx_rewrites, Path(scratch) / "model.onnx")
            argv = atc_command(
                request.spec, request.case.network, self.artifact_dims(request),
                model=model, output_dir=staging, soc_version=self.chip().soc_version,
            )
            (staging / ATC_RECORD).write_text(shlex.join(argv) + "\n")
            run_atc(atc, argv, Path(scratch), request.case.id)
        if not list(staging.glob("*.om")):
            raise BackendError(f"ATC exited 0 for {request.case.id} but wrote no .om into {staging}")

    def load(self, artifact: Path, request: CompileRequest) -> OmSession:
        models = sorted(Path(artifact).glob("*.om"))
        if len(models) != 1:
            raise BackendError(f"{artifact}: expected one .om file, found {[m.name for m in models]}")
        from ais_bench.infer.interface import InferSession

        try:
            session = InferSession(self.config.device_index, str(models[0]))
        except Exception as exc:  # noqa: BLE001 - ACL load failures surface as RuntimeError with a code
            where = f"{models[0]} on device {self.config.device_index}"
            raise BackendError(f"ais_bench cannot load {where}: {exc}") from exc
        net = request.spec.networks[request.case.network]
        signature = tuple(tuple(request.example_feeds[i.name].shape) for i in net.inputs)
        expected = {signature: request.expected_output_shapes()}
        return OmSession(session, net, OmSettings.of(request.spec, request.case.network).dynamic_dims, expected,
                         output_names=request.output_names)
