"""ONNX export with either torch exporter, always to one self-contained file at a checked opset."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch


class ExportError(RuntimeError):
    """The exporter failed or produced a file that does not meet the request."""


class _OutputsAsTuple(torch.nn.Module):
    """Presents a network's outputs as a tuple in ONNX output-name order, always in eval mode."""

    def __init__(self, network: torch.nn.Module, output_names: Sequence[str]):
        super().__init__()
        self.network = network
        self.output_names = list(output_names)

    def forward(self, *inputs: torch.Tensor):
        result = self.network(*inputs)
        if isinstance(result, Mapping):
            return tuple(result[name] for name in self.output_names)
        if isinstance(result, torch.Tensor):
            return (result,)
        return tuple(result)

    def train(self, mode: bool = True):
        # An exporter (or a caller) switching to train mode would bake dropout and batch statistics
        # into the graph; the deployed network is always the eval-mode one.
        return super().train(False)


def opset_of(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError(f"{path}: declares no default-domain opset")


def export_onnx(
    network: torch.nn.Module,
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    path: Path,
    *,
    exporter: str,
    opset: int,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    extras: dict[str, Any] | None = None,
) -> None:
    """Export ``network`` to ``path`` (a single file) and verify the produced opset."""
    wrapper = _OutputsAsTuple(network, output_names).eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    input_names = list(feeds)
    extras = dict(extras or {})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            if exporter == "torchscript":
                extras.pop("custom_translation_table", None)
                torch.onnx.export(
                    wrapper, args, str(path), input_names=input_names, output_names=list(output_names),
                    opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes or None, **extras,
                )
            elif exporter == "dynamo":
                extras.pop("custom_opsets", None)
                dynamic_shapes = _dynamic_shapes(input_names, dynamic_axes) if dynamic_axes else None
                torch.onnx.export(
                    wrapper, args, str(path), input_names=input_names, output_names=list(output_names),
                    opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes,
                    verbose=False, **extras,
                )
            else:
                raise ExportError(f"unknown exporter {exporter!r} (use torchscript or dynamo)")
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many exception types
        raise ExportError(f"{exporter} export of {type(network).__name__} failed: {exc}") from exc
    sidecar = Path(str(path) + ".data")
    if sidecar.exists():
        raise ExportError(f"{path}: exporter wrote external data {sidecar.name}; expected a single file")
    produced = opset_of(path)
    if produced != opset:
        raise ExportError(
            f"{path}: asked {exporter} for opset {opset} but the file declares opset {produced}"
            + (" (the dynamo exporter cannot go below 18)" if exporter == "dynamo" and opset < 18 else "")
        )


def _dynamic_shapes(input_names: list[str], dynamic_axes: dict[str, dict[int, str]]):
    """dynamo's spelling of ``dynamic_axes``: one entry per forward() argument, and the wrapper's
    only argument is ``*inputs``, so the per-input specs sit in one nested tuple."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for name in input_names:
        axes = dynamic_axes.get(name, {})
        shapes.append({axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()} or None)
    return (tuple(shapes),)
