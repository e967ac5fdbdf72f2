"""ONNX rewrites at the OM boundary: what a graph needs before ATC reads it, named by a baseline's
``om.onnx_rewrites`` list and applied in order to a copy of the exported file (the ONNX artifact
itself, what every other backend runs, is left as exported)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tooling.backends.base import BackendError

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

