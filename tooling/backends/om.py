"""Ascend OM: the exported ONNX compiled by ATC, run through ais_bench's Python ``InferSession``.

The ATC command is generated from the model's yaml and the case, the way each guide writes it:

    atc --framework=5 --model=<onnx> --output=<artifact dir>/<stem> --input_format=NCHW
        --input_shape="<name>:<d0>,<d1>,...;..." --log=error --soc_version=Ascend<chip>

where the input names and shapes come from the network's ``inputs:`` filled with the case's
dims, and ``<chip>`` from ``npu-smi info`` (``310P3``). Everything a guide adds on top is data in
the ``om:`` section of ``baselines/<model>.yaml``; nothing here knows a model.

Schema (under ``networks.<net>.om``; a model-level ``om:`` holds defaults for every network):

    om:
      output: vp3d_seq{frames}   # required: the OM file stem, a str.format template over the case's
                                 #   dims and {batch} (tp_r_256x192_enc3_d256_h1024_mh8_bs{batch})
      input_format: NCHW         # --input_format (default NCHW); null leaves the flag out
      log: error                 # --log (default error); null leaves the flag out
      precision_mode: force_fp16 # --precision_mode, always written (default force_fp16: ATC's own
                                 #   default for inference, what a guide without the flag ran). Part
                                 #   of the artifact key; raw and decoded tolerances for the OM are
                                 #   looked up as backend_tolerances."om@<mode>", then "om".
      dynamic_dims:              # ATC dynamic dims: one OM serves exactly these buckets (2..100,
        dims: [height, width]    #   ATC's gear limits); named dims written as -1 in --input_shape
        buckets:                 #   one entry per bucket, values in the order of `dims` (the
          - [512, 768]           #   command writes them in the order of the -1s in --input_shape).
          - [512, 512]           #   Cases at other shapes are not parametrized for om at all.
      files:                     # flags whose value is a config file: the suite writes `content`
        fusion_switch_file:      #   under `name` next to the OM and passes --<flag>=<that path>
          name: fusion_switch.cfg
          content: |
            ...
        keep_dtype: {name: keep.cfg, content: "OpType::InstanceNorm\\n"}
      flags:                     # any further --<flag>=<value>, verbatim
        buffer_optimize: off_optimize
      onnx_rewrites: [onnxsim]   # ONNX rewrites run in order before ATC (ONNX_REWRITES below; a
                                 #   slice registers its own with @onnx_rewrite("name")).
                                 #   custom_ops_to_default_domain: ATC's ONNX parser reads custom
                                 #   operators (DeformableConv2D) from the default domain only.

To add a model: write its ``om:`` section, then copy the guide's ATC command(s) verbatim into
``fixtures/om/<model>.yaml``; tests/engine/test_om_backend.py checks that the generated command
equals the guide's for every batch size (and bucket) listed there.

Throughput is the guides' figure: batch x 1000 / mean NPU compute time in ms, from ais_bench's
own per-call timings (``OmSession.device_times_ms``), not host wall time. ais_bench comes in two
generations: the Ascend/tools build's ``sumary().exec_time_list`` holds one duration (ms) per call,
the ``ait`` benchmark component's ``summary().exec_time_list`` holds ``(start_ms, end_ms)`` pairs
(its own ``benchmark_process.py`` subtracts them); both are read.
"""
from __future__ import annotations

import importlib
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tooling.backends.base import Arrays, Availability, Backend, BackendError, CompileRequest
from tooling.backends.npu import NpuChip, chip_for_device, probe_npus
from tooling.model_spec import ModelSpec, ModelSpecError, NetworkSpec
from tooling.tools import ToolTimeout, run_tool

ATC_RECORD = "atc_command.txt"  # the command an artifact was built with (paths as ATC saw them, in staging)
_ATC_OUTPUT_TAIL = 8000


# -- the om: section --------------------------------------------------------------------------------
# ATC's --precision_mode values (CANN ATC reference); force_fp16 is its default for inference.
PRECISION_MODES = (
    "force_fp16", "allow_fp32_to_fp16", "allow_mix_precision", "allow_mix_precision_fp16",
    "must_keep_origin_dtype", "force_fp32", "cube_fp16in_fp32out",
)
DEFAULT_PRECISION_MODE = "force_fp16"
# ATC accepts between 2 and 100 gears in --dynamic_dims (--dynamic_batch_size alike).
MIN_GEARS, MAX_GEARS = 2, 100


@dataclass(frozen=True)
class DynamicDims:
    dims: tuple[str, ...]
    buckets: tuple[tuple[int, ...], ...]

    def serves(self, dims: Mapping[str, int]) -> bool:
        """Whether an OM built with these gears accepts inputs at the case's ``dims``."""
        return tuple(int(dims.get(d, -1)) for d in self.dims) in self.buckets

    def require_bucket(self, net: NetworkSpec, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """BackendError unless the input shapes fall in one of the buckets the OM was built for."""
        values: dict[str, int] = {}
        for spec in net.inputs:
            for template, actual in zip(spec.shape, shapes[spec.name]):
                if template in self.dims:
                    values[str(template)] = int(actual)
        bucket = tuple(values.get(d, -1) for d in self.dims)
        if bucket not in self.buckets:
            listed = "; ".join(",".join(map(str, b)) for b in self.buckets)
            raise BackendError(
                f"{net.name}: inputs with {dict(zip(self.dims, bucket))} match no --dynamic_dims bucket ({listed})"
            )


@dataclass(frozen=True)
class OmFile:
    name: str
    content: str


@dataclass(frozen=True)
class OmSettings:
    output: str
    input_format: str | None = "NCHW"
    log: str | None = "error"
    dynamic_dims: DynamicDims | None = None
    files: dict[str, OmFile] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    onnx_rewrites: tuple[str, ...] = ()
    precision_mode: str = DEFAULT_PRECISION_MODE

    @classmethod
    def of(cls, spec: ModelSpec, network: str) -> "OmSettings":
        raw: dict[str, Any] = {**(spec.om or {}), **(spec.networks[network].om or {})}
        where = f"baselines/{spec.name}.yaml: networks.{network}.om"
        known = {"output", "input_format", "log", "precision_mode", "dynamic_dims", "files", "flags", "onnx_rewrites"}
        unknown = set(raw) - known
        if unknown:
            raise ModelSpecError(f"{where}: unknown keys {sorted(unknown)} (see tooling/backends/om.py)")
        if "output" not in raw:
            raise ModelSpecError(f"{where}: missing required field 'output' (the OM file stem)")
        dynamic = None
        if raw.get("dynamic_dims"):
            try:
                dims = tuple(str(d) for d in raw["dynamic_dims"]["dims"])
                buckets = tuple(tuple(int(v) for v in b) for b in raw["dynamic_dims"]["buckets"])
            except (KeyError, TypeError, ValueError) as exc:
                message = f"{where}.dynamic_dims: needs dims (names) and buckets (int lists): {exc}"
                raise ModelSpecError(message) from exc
            if any(len(b) != len(dims) for b in buckets):
                raise ModelSpecError(f"{where}.dynamic_dims: each bucket needs one value per dim {list(dims)}")
            if not MIN_GEARS <= len(set(buckets)) <= MAX_GEARS:
                raise ModelSpecError(
                    f"{where}.dynamic_dims: ATC takes {MIN_GEARS} to {MAX_GEARS} distinct gears, got {len(set(buckets))}"
                    " (a single shape is a static OM: drop dynamic_dims and set the dims in the profile)"
                )
            dynamic = DynamicDims(dims, buckets)
        mode = str(raw.get("precision_mode") or DEFAULT_PRECISION_MODE)
        if mode not in PRECISION_MODES:
            raise ModelSpecError(f"{where}.precision_mode: {mode!r} is not an ATC precision mode {list(PRECISION_MODES)}")
        if "precision_mode" in (raw.get("flags") or {}):
            raise ModelSpecError(f"{where}.flags: set precision_mode as om.precision_mode (it keys tolerances)")
        try:
            files = {flag: OmFile(str(f["name"]), str(f["content"])) for flag, f in (raw.get("files") or {}).items()}
        except (KeyError, TypeError) as exc:
            raise ModelSpecError(f"{where}.files: each entry needs name and content ({exc})") from exc
        return cls(
            output=str(raw["output"]),
            input_format=raw.get("input_format", "NCHW"),
            log=raw.get("log", "error"),
            dynamic_dims=dynamic,
            files=files,
            flags={str(k): str(v) for k, v in (raw.get("flags") or {}).items()},
            onnx_rewrites=tuple(raw.get("onnx_rewrites") or ()),
            precision_mode=mode,
        )

    def key_fields(self) -> dict[str, Any]:
        """Everything here that changes the OM's bytes (part of its artifact key)."""
        return {
            "output": self.output, "input_format": self.input_format, "log": self.log,
            "precision_mode": self.precision_mode,
            "dynamic_dims": [list(self.dynamic_dims.dims), [list(b) for b in self.dynamic_dims.buckets]]
            if self.dynamic_dims else None,
            "files": {flag: [f.name, f.content] for flag, f in sorted(self.files.items())},
            "flags": dict(sorted(self.flags.items())),
            "onnx_rewrites": list(self.onnx_rewrites),
        }


def declares_om(spec: ModelSpec, network: str) -> bool:
    """Whether ``network`` is meant to become an OM: it has its own om: section, or the model-level
    one names the output (a model-level section of shared flags alone does not make every network
    an OM; FOMM's host-side networks have none)."""
    return bool(spec.networks[network].om) or "output" in (spec.om or {})


def gear_dim_order(net: NetworkSpec, dynamic: DynamicDims) -> tuple[str, ...]:
    """The dynamic dims in the order their -1s appear in ``--input_shape`` (inputs in order, then
    axes): ATC reads each --dynamic_dims gear in that order, whatever order the yaml lists them."""
    order: list[str] = []
    for spec in net.inputs:
        for template in spec.shape:
            if template in dynamic.dims:
                order.append(str(template))
    missing = [d for d in dynamic.dims if d not in order]
    if missing:
        raise ModelSpecError(f"{net.name}: om.dynamic_dims names {missing}, which no input shape uses")
    return tuple(order)


def dynamic_dims_arg(net: NetworkSpec, dynamic: DynamicDims) -> str:
    """``--dynamic_dims``'s value: one gear per bucket, values in the order of the -1s."""
    position = {d: i for i, d in enumerate(dynamic.dims)}
    order = [position[d] for d in gear_dim_order(net, dynamic)]
    return ";".join(",".join(str(bucket[i]) for i in order) for bucket in dynamic.buckets)


def input_shape_arg(net: NetworkSpec, dims: Mapping[str, int], dynamic: DynamicDims | None) -> str:
    """``--input_shape``'s value: every input with the case's dims, dynamic ones as -1."""
    filled = {**dims, **dict.fromkeys(dynamic.dims if dynamic else (), -1)}
    return ";".join(f"{i.name}:{','.join(map(str, i.concrete_shape(filled)))}" for i in net.inputs)


def atc_command(
    spec: ModelSpec, network: str, dims: Mapping[str, int], *, model: Path, output_dir: Path, soc_version: str
) -> list[str]:
    """The ATC argv (without the executable's path) for one network at the case's dims."""
    settings = OmSettings.of(spec, network)
    net = spec.networks[network]
    try:
        stem = settings.output.format(**dims)
    except KeyError as exc:
        raise ModelSpecError(f"om.output {settings.output!r} names {exc}, which the case does not set") from exc
    argv = ["atc", "--framework=5", f"--model={model}", f"--output={output_dir / stem}"]
    if settings.input_format is not None:
        argv.append(f"--input_format={settings.input_format}")
    argv.append(f"--input_shape={input_shape_arg(net, dims, settings.dynamic_dims)}")
    if settings.dynamic_dims:
        argv.append(f"--dynamic_dims={dynamic_dims_arg(net, settings.dynamic_dims)}")
    argv += [f"--{flag}={output_dir / f.name}" for flag, f in settings.files.items()]
    argv += [f"--{flag}={value}" for flag, value in settings.flags.items()]
    argv.append(f"--precision_mode={settings.precision_mode}")
    if settings.log is not None:
        argv.append(f"--log={settings.log}")
    argv.append(f"--soc_version={soc_version}")
    return argv


# -- ONNX rewrites before ATC -----------------------------------------------------------------------
OnnxRewrite = Callable[[onnx.ModelProto], onnx.ModelProto]
ONNX_REWRITES: dict[str, OnnxRewrite] = {}


def onnx_rewrite(name: str) -> Callable[[OnnxRewrite], OnnxRewrite]:
    """Register a rewrite that an ``om.onnx_rewrites`` list can name."""

    def register(fn: OnnxRewrite) -> OnnxRewrite:
        ONNX_REWRITES[name] = fn
        return fn

    return register


@onnx_rewrite("onnxsim")
def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError as exc:
        raise BackendError("the onnxsim rewrite needs the onnxsim package (pip install onnxsim)") from exc
    simplified, checked = onnxsim.simplify(model)
    if not checked:
        raise BackendError("onnxsim could not confirm that the simplified graph computes the same outputs")
    return simplified


_STANDARD_DOMAINS = {"", "ai.onnx"}


@onnx_rewrite("custom_ops_to_default_domain")
def custom_ops_to_default_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node of a custom domain moved to the default domain, whose opset import stays alone.

    ATC's ONNX parser refuses default-domain nodes when the model imports more than one domain
    (E16005) and looks a custom node up under its own domain, while CANN registers its custom
    operators (DeformableConv2D) under ``ai.onnx`` only. The file this writes fails onnx.checker
    (an unknown op in the default domain), which is why it exists only on the way into ATC.
    """
    moved = {node.domain for node in model.graph.node if node.domain not in _STANDARD_DOMAINS}
    if not moved:
        return model
    for function in model.functions:
        if function.domain in moved:
            raise BackendError(f"custom_ops_to_default_domain: {function.domain} defines local functions")
    for node in model.graph.node:
        if node.domain in moved:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain in _STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


# Elementwise ops that compute the same in int32 as in int64 for index arithmetic.
_INT_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Min", "Max", "Clip", "Where"}
_INT_COMPARISONS = {"Less", "Greater", "Equal", "LessOrEqual", "GreaterOrEqual"}
# Ops whose index inputs accept int32 as they are.
_INT32_INDEX_CONSUMERS = {"Gather", "GatherElements", "ScatterElements", "Slice", "Cast"}


@onnx_rewrite("int64_to_int32")
def int64_to_int32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run integer index arithmetic in int32, which Ascend AI Cores support where int64 falls back.

    Every ``Cast(to=int64)`` becomes ``Cast(to=int32)``; the elementwise ops and comparisons fed by
    such a value get int32 copies of their int64 constants (or a cast of other int64 inputs), and
    their results stay int32. A consumer outside those ops and the int32-capable index consumers
    gets a cast back to int64, so the graph stays valid; strict shape inference checks it.
    """
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    elem_type.update({name: helper.np_dtype_to_tensor_dtype(v.dtype) for name, v in constants.items()})

    narrowed: set[str] = set()
    added: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def converted(name: str, to: int) -> str:
        """``name`` as type ``to``: an int32 copy of a constant, or a Cast node."""
        if (name, to) not in added:
            new = f"{name}__as_{TensorProto.DataType.Name(to).lower()}"
            if name in constants and to == TensorProto.INT32:
                graph.initializer.append(numpy_helper.from_array(constants[name].astype(np.int32), new))
            else:
                nodes.append(helper.make_node("Cast", [name], [new], to=to, name=f"{new}__cast"))
            added[(name, to)] = new
        return added[(name, to)]

    for node in graph.node:
        target = next((a for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        if target is not None and target.i == TensorProto.INT64:
            target.i = TensorProto.INT32
            narrowed.add(node.output[0])
        elif any(i in narrowed for i in node.input):
            if node.op_type in _INT_ELEMENTWISE | _INT_COMPARISONS:
                for k, name in enumerate(node.input):
                    if name and name not in narrowed and elem_type.get(name) == TensorProto.INT64:
                        node.input[k] = converted(name, TensorProto.INT32)
                if node.op_type in _INT_ELEMENTWISE:
                    narrowed.update(node.output)
            elif node.op_type not in _INT32_INDEX_CONSUMERS:
                for k, name in enumerate(node.input):
                    if name in narrowed:
                        node.input[k] = converted(name, TensorProto.INT64)
        nodes.append(node)

    declared = [o.name for o in graph.output if o.name in narrowed]
    if declared:
        raise BackendError(f"int64_to_int32 would change the type of graph outputs {declared}")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale int64 annotations; re-inferred below
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError and ValidationError alike
        raise BackendError(f"int64_to_int32 left an inconsistent graph: {exc}") from exc


def apply_onnx_rewrites(source: Path, names: tuple[str, ...], target: Path) -> Path:
    """``source`` after the named rewrites, written to ``target`` (``source`` itself when none)."""
    if not names:
        return source
    unknown = [n for n in names if n not in ONNX_REWRITES]
    if unknown:
        raise BackendError(f"unknown ONNX rewrites {unknown}; registered: {sorted(ONNX_REWRITES)}")
    model = onnx.load(str(source))
    for name in names:
        model = ONNX_REWRITES[name](model)
    onnx.save(model, str(target))
    return target


# -- running ATC ------------------------------------------------------------------------------------
def toolkit_version(atc: str) -> str:
    """What identifies the CANN build that ``atc`` belongs to (part of the cache key)."""
    real = Path(atc).resolve()
    for directory in list(real.parents)[:4]:
        for candidate in ("version.info", "version.cfg", "ascend_toolkit_install.info"):
            path = directory / candidate
            if path.is_file():
                for line in path.read_text(errors="replace").splitlines():
                    if line.lower().startswith("version="):
                        return line.split("=", 1)[1].strip()
    stat = real.stat()
    return f"{real}:{stat.st_size}:{int(stat.st_mtime)}"


ATC_TIMEOUT_S = 3600  # the longest guide compile takes minutes; an hour means ATC hung


def run_atc(atc: str, argv: list[str], workdir: Path, label: str) -> None:
    """Run ATC; a non-zero exit or a hang raises BackendError carrying the command and ATC's output."""
    try:
        done = run_tool([atc, *argv[1:]], cwd=workdir, timeout_s=ATC_TIMEOUT_S, merge_stderr=True)
    except ToolTimeout as exc:
        raise BackendError(f"ATC for {label}: {exc}") from exc
    if done.returncode != 0:
        output = done.stdout.strip() or "(ATC printed nothing; see its logs under ~/ascend/log)"
        if len(output) > _ATC_OUTPUT_TAIL:
            output = "...\n" + output[-_ATC_OUTPUT_TAIL:]
        raise BackendError(
            f"ATC exited with {done.returncode} for {label}\ncommand: {shlex.join(argv)}\n--- ATC output ---\n{output}"
        )


# -- the backend ------------------------------------------------------------------------------------
def call_duration_ms(entry: Any) -> float:
    """One ``exec_time_list`` entry as a duration in ms: a float (Ascend/tools ais_bench) or a
    ``(start_ms, end_ms)`` pair (ait's ais_bench since late 2023)."""
    if isinstance(entry, (int, float, np.floating, np.integer)):
        return float(entry)
    try:
        start, end = entry
        duration = float(end) - float(start)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"ais_bench exec_time_list entry {entry!r} is neither ms nor (start_ms, end_ms)") from exc
    if duration < 0:
        raise BackendError(f"ais_bench exec_time_list entry {entry!r} ends before it starts")
    return duration


class OmSession:
    """ais_bench's ``InferSession`` behind the suite's ``run(feeds) -> {name: array}``.

    OM outputs come back as a list in the ONNX graph's output order; they are named by position.
    """

    def __init__(self, infer_session, net: NetworkSpec, dynamic: DynamicDims | None,
                 expected_shapes: dict[tuple, dict[str, tuple[int, ...]]]):
        self.session = infer_session
        self.net = net
        self.dynamic = dynamic
        self.output_names = net.output_names
        self.expected_shapes = expected_shapes  # per input-shape signature, for the shapes known

    def run(self, feeds: Mapping[str, np.ndarray]) -> Arrays:
        arrays = [np.ascontiguousarray(feeds[i.name], dtype=i.dtype) for i in self.net.inputs]
        shapes = {i.name: a.shape for i, a in zip(self.net.inputs, arrays)}
        mode = "static"
        if self.dynamic is not None:
            self.dynamic.require_bucket(self.net, shapes)
            mode = "dymdims"
        try:
            values = self.session.infer(arrays, mode=mode)
        except Exception as exc:  # noqa: BLE001 - aclruntime raises RuntimeError with ACL's error code
            raise BackendError(f"ais_bench infer ({mode}) failed for {self.net.name}: {exc}") from exc
        if len(values) != len(self.output_names):
            raise BackendError(f"the OM returned {len(values)} outputs, the network declares {self.output_names}")
        outputs = {name: np.asarray(v) for name, v in zip(self.output_names, values)}
        expected = self.expected_shapes.get(tuple(shapes[i.name] for i in self.net.inputs), {})
        for name, shape in expected.items():
            if tuple(outputs[name].shape) != tuple(shape):
                raise BackendError(f"the OM returned {name} with shape {outputs[name].shape}, expected {shape}")
        return outputs

    def device_times_ms(self) -> list[float]:
        """NPU compute time of every call so far, as ais_bench measures it (ms)."""
        # ais_bench spelt it `sumary` before it added `summary`.
        summary = getattr(self.session, "summary", None) or self.session.sumary
        return [call_duration_ms(entry) for entry in summary().exec_time_list]


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
        return OmSession(session, net, OmSettings.of(request.spec, request.case.network).dynamic_dims, expected)
