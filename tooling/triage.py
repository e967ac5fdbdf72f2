"""First-divergence triage: which node of the ONNX graph is the first to disagree between a reference
run and a failing backend.

Both sides run one graph in which every intermediate tensor is also a graph output. The reference is
ONNX Runtime with every graph rewrite off (the graph as written, the ``onnx`` backend); the candidate
is the backend under suspicion, loaded from that same file through its own ``load`` (and ``compile``,
for backends that compile). Node outputs are compared in graph order (ONNX requires topological
order) with ``tooling.compare``; the first one out of tolerance is named with its statistics and the
nodes feeding it. Nodes before it agree, so the fault is in that node's kernel (or in a rewrite that
replaced it), not upstream of it.

``onnx-vs-torch`` is localised per torch module instead: torch eager has no per-node outputs that
line up with an exported graph (the exporter folds BatchNorm into Conv, splits and renames ops), so
the network is exported once more with a copy of every submodule's output as an extra graph output
(a "probe"). Each probe is the same value on both sides by construction; the first module, in the
order modules finish, whose probe exceeds the tolerance between torch eager and ONNX Runtime (no
rewrites) is named, with the graph node that computes it.

What this can and cannot say:
- Exposing intermediates stops a backend from fusing across them, so a divergence that exists only
  in a fused kernel can vanish here; the report then says no node diverged while the outputs did.
- The probe export is a second export of the same network (same exporter and opset); a fault that
  depends on the exporter fusing across a module boundary can vanish the same way.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import onnx
import torch

from tooling import planning
from tooling.compare import OutputStats, compare_array
from tooling.envvars import positive_from_env
from tooling.model_spec import Tolerance

# Element types whose values the comparison is meaningful for (integer indices are compared too:
# a wrong TopK index is a divergence).
COMPARABLE = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
}

# Constant nodes compute nothing: their value is the graph's own, and a backend may legitimately
# narrow it (OpenVINO holds int64 slice bounds such as INT64_MAX as int32).
NOT_COMPUTED = {"Constant"}

T = TypeVar("T")
TRIAGE_MEMORY_ENV = "ZOO_TRIAGE_MEMORY_MB"  # megabytes of intermediates one triage run exposes per side
Runner = Callable[[Path], Any]  # exposed-graph path -> a session with run(feeds) -> {name: array}


class TriageUnsupported(RuntimeError):
    """The failing comparison cannot be localised per node; the message says why."""


@dataclass(frozen=True)
class NodeOutput:
    position: int  # index of the producing node in graph order
    node: str
    op_type: str
    tensor: str
    feeds_from: tuple[str, ...]  # producing nodes of the node's inputs ("input:x", "initializer:w")
    module: str | None = None  # the torch module whose output this is (onnx-vs-torch triage)


@dataclass
class Divergence:
    output: NodeOutput
    stats: OutputStats

    def as_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "node": self.output.node, "op_type": self.output.op_type, "tensor": self.output.tensor,
            "module": self.output.module,
            "position": self.output.position, "feeds_from": list(self.output.feeds_from),
            "shape": list(s.shape), "max_abs": s.max_abs, "mean_abs": s.mean_abs, "p99_abs": s.p99_abs,
            "max_rel": s.max_rel, "cosine": s.cosine, "violations": s.violations,
            "worst_index": list(s.worst_index), "worst_actual": s.worst_actual, "worst_expected": s.worst_expected,
            "atol": s.atol, "rtol": s.tolerance.rtol,
        }


@dataclass
class TriageReport:
    what: str  # e.g. "videopose3d vp3d-smoke-b2-torchscript: onnxruntime vs ONNX Runtime (no rewrites)"
    nodes: int  # nodes in the graph
    compared: int  # node outputs compared before stopping
    first: Divergence | None
    not_exposed: list[str] = field(default_factory=list)  # tensors the candidate did not return
    runs: int = 1  # graph runs per side: intermediates are exposed a memory budget at a time
    budget_bytes: int | None = None  # that budget (None: not reported by the caller)

    @property
    def _runs(self) -> str:
        if self.runs == 1:
            return ""
        return f" in {self.runs} runs of at most {self.budget_bytes / 2**20:.0f} MB of intermediates each"

    def summary(self) -> str:
        if self.first is None:
            unexposed = f"; {len(self.not_exposed)} not returned by the backend" if self.not_exposed else ""
            return (
                f"first-divergence triage ({self.what}): no node output out of tolerance among {self.compared} "
                f"compared (of {self.nodes} nodes){self._runs}{unexposed}"
            )
        d, s = self.first.output, self.first.stats
        module = f"module {d.module!r}, computed by " if d.module else ""
        return (
            f"first-divergence triage ({self.what}): first diverging {module}node #{d.position} {d.node!r} ({d.op_type}) "
            f"output {d.tensor!r} {s.shape}: max_abs={s.max_abs:.3g} mean_abs={s.mean_abs:.3g} "
            f"p99_abs={s.p99_abs:.3g} max_rel={s.max_rel:.3g} cos={s.cosine:.7f}, {s.violations} elements out "
            f"(atol={s.atol:.3g} rtol={s.tolerance.rtol:g}); worst@{s.worst_index}: got {s.worst_actual:.6g} "
            f"want {s.worst_expected:.6g}; fed by {', '.join(d.feeds_from) or 'nothing'}; "
            f"{self.compared - 1} earlier {'module' if d.module else 'node'} outputs agree{self._runs}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what, "nodes": self.nodes, "compared": self.compared,
            "first_divergence": self.first.as_dict() if self.first else None, "not_exposed": self.not_exposed,
            "runs": self.runs, "budget_bytes": self.budget_bytes,
        }


def node_outputs(model: onnx.ModelProto) -> list[NodeOutput]:
    """Every node output of the main graph, in graph order, with the nodes feeding its node."""
    graph = model.graph
    producer = {i.name: f"input:{i.name}" for i in graph.input}
    producer.update({init.name: f"initializer:{init.name}" for init in graph.initializer})
    result = []
    for position, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{position}"
        feeds = tuple(dict.fromkeys(producer.get(i, f"?:{i}") for i in node.input if i))
        for tensor in node.output:
            if tensor:
                result.append(NodeOutput(position, name, node.op_type, tensor, feeds))
                producer[tensor] = name
    return result


def comparable_outputs(model: onnx.ModelProto, types: Mapping[str, Any]) -> list[NodeOutput]:
    """The node outputs whose values can be compared, in graph order: typed (``types``, from
    ``_tensor_types``), of a comparable element type, computed (not Constant)."""
    comparable = []
    for out in node_outputs(model):
        if out.op_type in NOT_COMPUTED:
            continue
        tensor_type = types.get(out.tensor)
        if tensor_type is None or not tensor_type.HasField("tensor_type"):
            continue
        if tensor_type.tensor_type.elem_type not in COMPARABLE:
            continue
        comparable.append(out)
    return comparable


def expose_intermediates(model: onnx.ModelProto, outputs: list[NodeOutput], types: Mapping[str, Any]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include the tensors of ``outputs``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for out in outputs:
        if out.tensor not in present:
            elem_type = types[out.tensor].tensor_type.elem_type
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(out.tensor, elem_type, None))
            present.add(out.tensor)
    return exposed


def _tensor_types(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every tensor's inferred type; with ``feeds``, inferred at the feeds' shapes (dynamic inputs
    pinned) so that most dims come out concrete."""
    if feeds is not None:
        pinned = onnx.ModelProto()
        pinned.CopyFrom(model)
        for graph_input in pinned.graph.input:
            if graph_input.name in feeds and graph_input.type.HasField("tensor_type"):
                shape = graph_input.type.tensor_type.shape
                shape.ClearField("dim")
                for size in np.shape(feeds[graph_input.name]):
                    shape.dim.add().dim_value = int(size)
        model = pinned
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=feeds is not None)
    except Exception:  # noqa: BLE001 - a custom domain op stops inference; graph types still serve
        inferred = model
    graph = inferred.graph
    return {vi.name: vi.type for vi in [*graph.value_info, *graph.input, *graph.output]}


def estimated_bytes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], outputs: list[NodeOutput]) -> list[int]:
    """Each output's size at these feeds, from shape inference; where a dim stays unknown (after a
    custom-domain op, a data-dependent shape) the nearest earlier known size stands in: layers of a
    network change tensor sizes gradually, and an underestimate only makes one run hold more."""
    types = _tensor_types(model, feeds)
    known = max((np.asarray(v).nbytes for v in feeds.values()), default=0)
    sizes = []
    for out in outputs:
        tensor_type = types.get(out.tensor)
        tensor = tensor_type.tensor_type if tensor_type is not None and tensor_type.HasField("tensor_type") else None
        if tensor is not None and tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            item = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
            known = item * math.prod(d.dim_value for d in tensor.shape.dim)
        sizes.append(known)
    return sizes


def exposure_runs(outputs: list[T], sizes: list[int], budget_bytes: int) -> list[list[T]]:
    """Consecutive runs of ``outputs`` (graph or call order) whose sizes add up to at most
    ``budget_bytes``; an output larger than the budget is a run of its own."""
    runs: list[list[T]] = []
    held = budget_bytes + 1
    for out, size in zip(outputs, sizes):
        if held + size > budget_bytes:
            runs.append([])
            held = 0
        runs[-1].append(out)
        held += size
    return runs


def memory_budget_bytes() -> int:
    """Bytes of intermediates one triage run exposes per side: ``ZOO_TRIAGE_MEMORY_MB``, else a
    sixth of the memory available now. A run holds the exposed tensors twice on each side (the
    runtime's buffers and the arrays it returns) and the comparison widens one pair to float64, so
    a sixth keeps the triage near half of what is free (measured: GMA at 440 x 1024, 7.3 GB of
    intermediates exposed at once, peaked at 20.8 GB)."""
    megabytes = positive_from_env(TRIAGE_MEMORY_ENV, None, "megabytes")
    if megabytes is not None:
        return int(megabytes * 2**20)
    return _available_bytes() // 6


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def first_divergence(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    reference: Runner,
    candidate: Runner,
    tolerance: Tolerance,
    what: str,
    workdir: Path | None = None,
    budget_bytes: int | None = None,
) -> TriageReport:
    """Run the intermediate-exposed graph on both sides and name the first node out of tolerance.

    The intermediates are exposed a run at a time, in graph order, each run's estimated size within
    ``budget_bytes`` (default ``memory_budget_bytes()``): exposing all of a deploy-shape graph at once
    holds every intermediate of both sides together (GMA at 440 x 1024: 7.3 GB each), more than a
    host may have. The search stops at the run holding the first divergence; each run executes the
    whole graph again (and compiles it again, for a compiling backend)."""
    types = _tensor_types(model)
    outputs = comparable_outputs(model, types)
    budget = memory_budget_bytes() if budget_bytes is None else budget_bytes
    runs = exposure_runs(outputs, estimated_bytes(model, feeds, outputs), budget)
    compared, missing = 0, []
    for number, run in enumerate(runs, start=1):
        exposed = expose_intermediates(model, run, types)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = Path(tmp) / "exposed.onnx"
            onnx.save(exposed, str(path))
            expected = reference(path).run(feeds)
            actual = candidate(path).run(feeds)
        del exposed
        for out in run:
            if out.tensor not in actual or out.tensor not in expected:
                missing.append(out.tensor)
                continue
            compared += 1
            if np.array_equal(actual[out.tensor], expected[out.tensor]):
                continue  # bit-identical (most nodes of a sound backend): skip the statistics
            stats = compare_array(out.tensor, actual[out.tensor], expected[out.tensor], tolerance)
            if not stats.passed:
                return TriageReport(what, len(model.graph.node), compared, Divergence(out, stats), missing,
                                    runs=number, budget_bytes=budget)
        del expected, actual
    return TriageReport(what, len(model.graph.node), compared, None, missing, runs=len(runs), budget_bytes=budget)


def node_tolerance(tolerances: Mapping[str, Tolerance]) -> Tolerance:
    """One bound for intermediate tensors, from the gate's per-output tolerances: the loosest
    relative and range-scaled parts, the tightest absolute floor and the lowest cosine floor (an
    intermediate has no yaml tolerance of its own; it must not be held tighter than any output)."""
    values = list(tolerances.values())
    return Tolerance(
        atol=max(t.atol for t in values),
        rtol=max(t.rtol for t in values),
        min_cosine=min(t.min_cosine for t in values),
        atol_of_max=max(t.atol_of_max for t in values),
        allow_nonfinite=any(t.allow_nonfinite for t in values),
    )


class _ModuleProbes(torch.nn.Module):
    """The network, returning its outputs followed by a copy of each listed submodule call's tensor
    output, in the order the calls finish (a copy: a later in-place op must not change it)."""

    def __init__(self, network: torch.nn.Module, output_names: list[str], probes: list[str] | None = None):
        super().__init__()
        self.network = network
        self.output_names = output_names
        self.probes = probes  # None: record which calls there are and their sizes, capture none
        self.seen: list[str] = []
        self.sizes: list[int] = []

    def forward(self, *inputs):
        captured: list[torch.Tensor] = []
        calls: dict[str, int] = {}
        self.seen, self.sizes = [], []

        def hook(name):
            def record(module, args, output):
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    count = calls[name] = calls.get(name, 0) + 1
                    label = name if count == 1 else f"{name}#{count}"
                    if self.probes is None:
                        self.seen.append(label)
                        self.sizes.append(output.numel() * output.element_size())
                    elif label in self.probes:
                        self.seen.append(label)
                        captured.append(output.clone())
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.network.named_modules() if n]
        try:
            result = self.network(*inputs)
        finally:
            for h in handles:
                h.remove()
        if isinstance(result, Mapping):
            result = tuple(result[n] for n in self.output_names)
        elif isinstance(result, torch.Tensor):
            result = (result,)
        return (*result, *captured)


def probe_modules(network: torch.nn.Module, feeds: Mapping[str, np.ndarray], output_names: list[str],
                  tolerance: Tolerance, export: Callable[[torch.nn.Module, list[str], Path], None], what: str,
                  perturb: Callable[[Path], Path] | None = None, budget_bytes: int | None = None) -> TriageReport:
    """Torch eager against ONNX Runtime (no rewrites) per submodule output: the first module whose
    exported output exceeds ``tolerance``, with the graph node computing it. The probes go out in
    consecutive runs within the memory budget (``first_divergence``), each run one more export."""
    args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
    discover = _ModuleProbes(network, output_names).eval()
    with torch.inference_mode():
        discover(*args)
    budget = memory_budget_bytes() if budget_bytes is None else budget_bytes
    runs = exposure_runs(list(discover.seen), discover.sizes, budget)
    compared, nodes = 0, 0
    for number, probes in enumerate(runs, start=1):
        wrapper = _ModuleProbes(network, output_names, probes).eval()
        with torch.inference_mode():
            eager = [t.numpy() for t in wrapper(*args)[len(output_names):]]
        names = [f"probe:{p}" for p in probes]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probes.onnx"
            export(wrapper, output_names + names, path)
            model = onnx.load(str(path))
            run_path = perturb(path) if perturb else path
            exported = _reference_session(run_path).run(dict(feeds))
        nodes = len(model.graph.node)
        for probe, name, expected in zip(probes, names, eager):
            out = _computing_node(model, name)
            if out is None or name not in exported:
                continue
            compared += 1
            stats = compare_array(name, exported[name], expected, tolerance)
            if not stats.passed:
                located = NodeOutput(out.position, out.node, out.op_type, out.tensor, out.feeds_from, module=probe)
                return TriageReport(what, nodes, compared, Divergence(located, stats), runs=number, budget_bytes=budget)
        del eager, exported, model
    return TriageReport(what, nodes, compared, None, runs=len(runs), budget_bytes=budget)


def _computing_node(model: onnx.ModelProto, tensor: str) -> NodeOutput | None:
    """The node computing a probe output, looking through the Identity copies the exporter may put
    between the computing op and the graph output."""
    made_by = {out: (node, position) for position, node in enumerate(model.graph.node) for out in node.output}
    while tensor in made_by and made_by[tensor][0].op_type == "Identity" and made_by[tensor][0].input[0] in made_by:
        tensor = made_by[tensor][0].input[0]
    return next((o for o in node_outputs(model) if o.tensor == tensor), None)


def _reference_session(path: Path):
    from tooling.backends.cpu import OrtSession

    return OrtSession(path, threads=1, optimize=False, providers=["CPUExecutionProvider"])


def triage_export(handle, case, feeds: Mapping[str, np.ndarray] | None = None,
                  perturb: Callable[[Path], Path] | None = None) -> TriageReport:
    """onnx-vs-torch triage of ``case``: the first torch module whose exported output diverges."""
    from tooling.export import export_onnx

    net = handle.spec.networks[case.network]
    if not net.variant(case.variant).runs_on("onnxruntime"):
        raise TriageUnsupported(f"{case.id}: no ONNX runtime here executes this variant's graph")
    module, _ = handle.network(case.network, case.variant, handle.weights(case.network))
    feeds = dict(feeds if feeds is not None else handle.feeds(case))
    opset = net.variant(case.variant).opset.get(case.exporter) or net.opset.get(case.exporter)
    extras = handle.slice.export_extras(case.network, case.variant, case.exporter)

    def export(wrapper: torch.nn.Module, names: list[str], path: Path) -> None:
        export_onnx(wrapper, feeds, names, path, exporter=case.exporter, opset=opset, extras=extras)

    tolerance = node_tolerance(planning.tolerances(handle.spec, case.network, "onnx"))
    what = (f"{handle.spec.name} {case.id}: ONNX Runtime with no graph rewrites vs torch eager, per module "
            f"(a {case.exporter} export probing every submodule output)")
    return probe_modules(module, feeds, list(net.output_names), tolerance, export, what, perturb)


def triage_case(handle, case, backend_name: str, feeds: Mapping[str, np.ndarray] | None = None,
                perturb: Callable[[Path], Path] | None = None) -> TriageReport:
    """First-divergence triage of ``case`` on ``backend_name`` against ONNX Runtime with no rewrites,
    on the case's exported graph and example inputs (what the parity gates compare); for ``onnx``
    (the onnx-vs-torch gate), against torch eager per module (``triage_export``).

    ``perturb`` rewrites the graph the candidate loads (fault injection in tests)."""
    if backend_name == "onnx":
        return triage_export(handle, case, feeds, perturb)
    if backend_name == "torch":
        raise TriageUnsupported("torch is the reference of every parity gate, not a backend that can diverge")
    ws = handle.ws
    backend = ws.backend(backend_name)
    if backend.consumes != "onnx":
        raise TriageUnsupported(f"{backend_name} compiles the torch network, not the ONNX graph: nothing to align nodes with")
    net = handle.spec.networks[case.network]
    if not net.variant(case.variant).runs_on("onnxruntime"):
        raise TriageUnsupported(f"{case.id}: no ONNX runtime here executes this variant's graph, so there is no node-level reference")
    feeds = dict(feeds if feeds is not None else handle.feeds(case))
    model = onnx.load(str(handle.onnx(case, dynamic_dims=backend.dynamic_input_dims(handle.compile_request(case)))))
    request = handle.compile_request(case)
    tolerances = planning.tolerances(handle.spec, case.network, backend.name)  # the gate's (om@<precision mode>)
    reference_backend = ws.backend("onnx")

    def reference(path: Path):
        return reference_backend.load(path, replace(request, onnx_path=path))

    def candidate(path: Path):
        path = perturb(path) if perturb else path
        graph_outputs = tuple(o.name for o in onnx.load(str(path), load_external_data=False).graph.output)
        exposed_request = replace(request, onnx_path=path, expected_output_shapes=lambda: {}, output_names=graph_outputs)
        if backend.needs_compile:
            staging = path.parent / f"{backend_name}-artifact"
            staging.mkdir()
            backend.compile(exposed_request, staging)
            return backend.load(staging, exposed_request)
        return backend.load(path, exposed_request)

    what = f"{handle.spec.name} {case.id}: {backend_name} vs ONNX Runtime with no graph rewrites"
    return first_divergence(model, feeds, reference, candidate, node_tolerance(tolerances), what)
