"""The ais_bench ``InferSession`` behind the suite's session interface, and its own timings.

Throughput is the guides' figure: batch x 1000 / mean NPU compute time in ms, from ais_bench's
own per-call timings (``OmSession.device_times_ms``), not host wall time. ais_bench comes in two
generations: the Ascend/tools build's ``sumary().exec_time_list`` holds one duration (ms) per call,
the ``ait`` benchmark component's ``summary().exec_time_list`` holds ``(start_ms, end_ms)`` pairs
(its own ``benchmark_process.py`` subtracts them); both are read.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tooling.backends.atc import DynamicDims
from tooling.backends.base import Arrays, BackendError
from tooling.model_spec import NetworkSpec

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

    OM outputs come back as a list in the ONNX graph's output order; they are named by position,
    after the network's outputs or, for a graph with more (the triage's), after ``output_names``.
    """

    def __init__(self, infer_session, net: NetworkSpec, dynamic: DynamicDims | None,
                 expected_shapes: dict[tuple, dict[str, tuple[int, ...]]],
                 output_names: tuple[str, ...] | None = None):
        self.session = infer_session
        self.net = net
        self.dynamic = dynamic
        self.output_names = tuple(output_names) if output_names is not None else net.output_names
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
            raise BackendError(f"the OM returned {len(values)} outputs, the graph declares {len(self.output_names)}: "
                               f"{list(self.output_names)[:8]}{' ...' if len(self.output_names) > 8 else ''}")
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
