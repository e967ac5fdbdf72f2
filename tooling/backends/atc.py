"""ATC, the Ascend model compiler: the ``om:`` settings of a baseline, the command generated from
them for one case, and running it.

The command is what each guide writes:

    atc --framework=5 --model=<onnx> --output=<artifact dir>/<stem> --input_format=NCHW
        --input_shape="<name>:<d0>,<d1>,...;..." --log=error --soc_version=Ascend<chip>

with the input names and shapes from the network's ``inputs:`` filled with the case's dims and
``<chip>`` from ``npu-smi info``. Everything a guide adds on top is data in the ``om:`` section of
``baselines/<model>.yaml``, whose keys are stated once, in ``OM`` of tooling/schema.py; nothing here
knows a model. ``fixtures/om/<model>.yaml`` holds each guide's ATC commands verbatim, and
tests/engine/test_om_backend.py checks the generated ones against them.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tooling.backends.base import BackendError
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
        """The merged model- and network-level ``om:`` sections. The baseline schema (``OM`` in
        tooling/schema.py) has checked each section's keys and types when the yaml was read; what
        is checked here depends on the merge or on ATC's own limits."""
        raw: dict[str, Any] = {**(spec.om or {}), **(spec.networks[network].om or {})}
        where = f"baselines/{spec.name}.yaml: networks.{network}.om"
        if "output" not in raw:
            raise ModelSpecError(f"{where}: missing required field 'output' (the OM file stem)")
        dynamic = None
        if raw.get("dynamic_dims"):
            dims = tuple(str(d) for d in raw["dynamic_dims"]["dims"])
            buckets = tuple(tuple(int(v) for v in b) for b in raw["dynamic_dims"]["buckets"])
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
        files = {flag: OmFile(str(f["name"]), str(f["content"])) for flag, f in (raw.get("files") or {}).items()}
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

