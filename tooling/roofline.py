"""Roofline figures for throughput rows: the work one call does, counted from the ONNX graph, and
the host's measured peak, so a rate reads as "x GFLOP/s, y % of what this CPU can do".

``graph_flops`` counts floating-point operations (a multiply-add is 2) of one call of an ONNX graph
at given input shapes, shapes from ONNX shape inference. Convolutions and matrix products are
counted exactly; normalisation, pooling, resampling and element-wise ops by a per-element cost
(``ELEMENTWISE``): they are a few percent of a vision network and the figure is a rate estimate,
not a bill. Ops whose output shape inference cannot give are left out and listed.

``host_peak_gflops`` is a float32 matrix-multiply microbenchmark (torch, so MKL/oneDNN: the best
GEMM the host offers) per thread count: the best of many short products (robust to a loaded host),
measured once per process, and with a cache dir the best of the first few processes, kept there. Shapes come from ONNX
Runtime's symbolic shape inference (``onnxruntime.tools``), which follows the shape arithmetic of
dynamic-axis exports.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Mapping, Sequence

import onnx
from onnx import shape_inference

# FLOPs per output element for ops that are not matrix products. Counted so that a graph made of
# them is not reported as free; the exact constant matters little next to the convolutions.
ELEMENTWISE: dict[str, float] = {
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Max", "Min", "Relu", "LeakyRelu", "Neg", "Abs", "Sum",
                     "Clip", "PRelu", "Where", "Pow", "Sqrt", "Reciprocal"), 1.0),
    **dict.fromkeys(("Sigmoid", "Tanh", "Exp", "Log", "Erf", "HardSigmoid", "HardSwish"), 4.0),
    "Gelu": 8.0, "Softmax": 5.0, "LogSoftmax": 5.0,
    "BatchNormalization": 2.0, "InstanceNormalization": 5.0, "LayerNormalization": 5.0,
    "GroupNormalization": 5.0,
    "GridSample": 8.0,  # bilinear: four taps and their weights per output element
    "Resize": 4.0,
}
POOLING = ("MaxPool", "AveragePool")
REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "GlobalAveragePool", "GlobalMaxPool")


@dataclass
class GraphFlops:
    total: float  # FLOPs per call
    by_op: dict[str, float] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)  # nodes whose shapes inference could not give


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return None if any(d < 0 for d in dims) else dims


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _with_input_shapes(model: onnx.ModelProto, feeds_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    missing = [i.name for i in graph_inputs if i.name not in feeds_shapes]
    if missing:
        raise ValueError(f"graph_flops: no shape given for graph inputs {missing}")
    for value in graph_inputs:
        shape = value.type.tensor_type.shape
        wanted = list(feeds_shapes[value.name])
        if len(shape.dim) != len(wanted):
            raise ValueError(f"graph_flops: input {value.name} has rank {len(shape.dim)}, shape given {wanted}")
        for dim, size in zip(shape.dim, wanted):
            dim.Clear()
            dim.dim_value = int(size)
    return model


SHAPE_TENSOR_LIMIT = 1024  # initializers up to this many elements may hold shapes: kept as data


def _weights_as_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Turn large initializers (weights) into graph inputs of the same shape: inference needs their
    shapes, not their values, and copying tens of MB of weights through it takes seconds."""
    graph = model.graph
    weights = [i for i in graph.initializer if math.prod(i.dims) > SHAPE_TENSOR_LIMIT]
    names = {w.name for w in weights}
    declared = {i.name for i in graph.input}
    for weight in weights:
        if weight.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    kept = [i for i in graph.initializer if i.name not in names]
    shapes = {w.name: tuple(w.dims) for w in weights}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return shapes


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of every tensor at the given input shapes. ONNX Runtime's symbolic shape inference
    follows shape arithmetic (Shape -> Gather -> Concat -> Reshape, as the TorchScript exporter
    writes for dynamic axes) that onnx's own inference leaves unknown; onnx's is the fallback."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op ORT's inference does not know (a custom domain node): onnx's own
        return shape_inference.infer_shapes(model, data_prop=True)


def graph_flops(onnx_path: Path | str | onnx.ModelProto, feeds_shapes: Mapping[str, Sequence[int]]) -> GraphFlops:
    """FLOPs of one call of the graph with inputs of ``feeds_shapes`` (name -> shape)."""
    if isinstance(onnx_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(onnx_path)  # the caller's model stays untouched
    else:
        model = onnx.load(str(onnx_path), load_external_data=False)
    model = _with_input_shapes(model, feeds_shapes)
    weight_shapes = _weights_as_inputs(model)
    graph = _infer_shapes(model).graph
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(value)
        if dims is not None:
            shapes[value.name] = dims
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    shapes.update(weight_shapes)

    result = GraphFlops(0.0)
    for node in graph.node:
        flops = _node_flops(node, shapes)
        if flops is None:
            result.uncounted.append(f"{node.op_type} {node.name or node.output[0]}")
            continue
        if flops:
            result.by_op[node.op_type] = result.by_op.get(node.op_type, 0.0) + flops
            result.total += flops
    return result


def _node_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> float | None:
    """FLOPs of one node; None when a shape it needs is unknown; 0 for data movement."""
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None

    def need(*names: str) -> list[tuple[int, ...]] | None:
        found = [shapes.get(n) for n in names]
        return None if any(f is None for f in found) else found

    if op in ("Conv", "DeformConv"):
        got = need(node.input[1])
        if got is None or out is None:
            return None
        (weight,) = got
        # Each output element: Cin/group x kernel multiply-adds (weight is [Cout, Cin/group, *k]).
        macs = math.prod(out) * math.prod(weight[1:])
        extra = math.prod(out) * math.prod(weight[1:]) * 4 if op == "DeformConv" else 0  # bilinear taps
        return 2.0 * macs + extra
    if op == "ConvTranspose":
        got = need(node.input[0], node.input[1])
        if got is None:
            return None
        x, weight = got  # weight is [Cin, Cout/group, *k]: each input element feeds Cout/group x k outputs
        return 2.0 * math.prod(x) * math.prod(weight[1:])
    if op == "MatMul":
        got = need(node.input[0])
        if got is None or out is None:
            return None
        return 2.0 * math.prod(out) * got[0][-1]
    if op == "Gemm":
        got = need(node.input[0])
        if got is None or out is None:
            return None
        k = got[0][0] if _attribute(node, "transA", 0) else got[0][-1]
        return 2.0 * math.prod(out) * k + math.prod(out)
    if op in POOLING:
        if out is None:
            return None
        return float(math.prod(out) * math.prod(_attribute(node, "kernel_shape", [1])))
    if op in REDUCE:
        got = need(node.input[0])
        return None if got is None else float(math.prod(got[0]))
    if op in ELEMENTWISE:
        return None if out is None else ELEMENTWISE[op] * math.prod(out)
    return 0.0  # shape and data movement (Reshape, Transpose, Slice, Concat, Gather, ...)


# -- the host's peak ------------------------------------------------------------------------------
# A product of 512 x 512 (0.27 GFLOP, a few ms on one core) is compute-bound on the CPUs we run on
# and short enough that some products run inside one scheduler slice even when other processes
# share the cores; the best of many is then the unloaded rate. At 1024 (tens of ms) every product
# of a loaded host is cut by the scheduler: measured on this 2-core host with three busy
# processes beside it, 1024 read 47-53 GFLOP/s and 512 read 99-104, against 105 unloaded, which
# is how cells read "180 % of peak".
PEAK_MATRIX = 512
PEAK_BURSTS = 5  # short bursts a little apart: a burst inside a neighbour's busy spell is outvoted
PEAK_BURST_SECONDS = 0.05
PEAK_PAUSE_SECONDS = 0.01
# Processes that measure before the cached best is trusted alone: each measures at another moment
# of the host's load and the cache keeps the highest; later processes measure nothing.
PEAK_MEASUREMENTS = 3
PEAK_CACHE = "probes/host-gemm-peak-{key}.json"  # under the artifact cache, beside the backend probes


def measure_gemm_peak(threads: int) -> float:
    """Best float32 GEMM rate (GFLOP/s) of ``threads`` threads now (torch, so MKL/oneDNN: the best
    GEMM the host offers), as the best product of several short bursts."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a = torch.randn(PEAK_MATRIX, PEAK_MATRIX)
        b = torch.randn(PEAK_MATRIX, PEAK_MATRIX)
        c = torch.empty(PEAK_MATRIX, PEAK_MATRIX)
        torch.mm(a, b, out=c)  # warm-up: kernel selection and page faults
        best = math.inf
        for _ in range(PEAK_BURSTS):
            deadline = time.perf_counter() + PEAK_BURST_SECONDS
            while time.perf_counter() < deadline or best == math.inf:
                start = time.perf_counter()
                torch.mm(a, b, out=c)
                best = min(best, time.perf_counter() - start)  # a noisy neighbour only ever adds time
            time.sleep(PEAK_PAUSE_SECONDS)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * PEAK_MATRIX**3 / best / 1e9


def _peak_key(threads: int) -> dict:
    import torch

    from tooling.verdict_key import host_cpu

    return {"cpu": host_cpu()["cpu"], "threads": threads, "torch": torch.__version__, "matrix": PEAK_MATRIX}


@cache
def host_peak_gflops(threads: int, cache_dir: Path | None = None) -> float:
    """This host's float32 GEMM peak (GFLOP/s) on ``threads`` threads, once per process. With a
    ``cache_dir``, the best of the first ``PEAK_MEASUREMENTS`` processes' measurements, kept in
    ``<cache_dir>/probes`` per CPU model, thread count and torch version (updated under a lock)."""
    if cache_dir is None:
        return measure_gemm_peak(threads)
    import hashlib
    import json

    from filelock import FileLock

    from tooling.jsonio import write_json

    key = _peak_key(threads)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / PEAK_CACHE.format(key=digest)
    stored = _read_peak(path, key)
    if stored and stored["measurements"] >= PEAK_MEASUREMENTS:
        return float(stored["gflops"])
    measured = measure_gemm_peak(threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            stored = _read_peak(path, key) or {"gflops": 0.0, "measurements": 0}
            best = max(float(stored["gflops"]), measured)
            write_json(path, {"key": key, "gflops": best, "measurements": stored["measurements"] + 1})
    except OSError:  # a read-only cache (or a lock that never came): this process's own measurement
        return max(measured, float((stored or {}).get("gflops", 0.0)))
    return best


def _read_peak(path: Path, key: dict) -> dict | None:
    import json

    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("gflops"), (int, float)) \
        and isinstance(stored.get("measurements"), int)
    return stored if ok else None


OVER_PEAK = "peak measured low"


def roofline(flop_per_call: float, seconds_per_call: float, peak_gflops: float | None) -> dict[str, float | str | None]:
    """The figures a throughput row carries: GFLOP per call, achieved GFLOP/s, fraction of peak.
    A rate above the measured peak means the peak was measured low (or the count is high): no
    fraction then, ``peak_note`` says so instead of a percentage above 100."""
    achieved = flop_per_call / seconds_per_call / 1e9
    over = bool(peak_gflops) and achieved > peak_gflops
    return {
        "gflop_per_call": round(flop_per_call / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "peak_gflops": round(peak_gflops, 1) if peak_gflops else None,
        "peak_fraction": round(achieved / peak_gflops, 3) if peak_gflops and not over else None,
        "peak_note": f"{OVER_PEAK}: {achieved:.1f} GFLOP/s achieved > {peak_gflops:.1f} measured" if over else None,
    }
