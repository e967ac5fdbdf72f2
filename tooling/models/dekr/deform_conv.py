"""The 3x3 deformable convolution of DEKR's AdaptBlock, in three exportable variants.

Semantics (spec §a): torchvision ``deform_conv2d`` DCNv1, stride 1, padding 1, dilation 1, one
offset group, no bias. The 18-channel offset holds, for tap ``k = 3*i + j``, the row (y)
displacement in channel ``2k`` and the column (x) displacement in channel ``2k+1``. Samples outside
the map read zeros, with bilinear weights (``grid_sample``, ``padding_mode='zeros'``,
``align_corners=False`` reproduces this exactly).

The variant is part of an exported artifact's identity, because each one yields a different graph:

- ``grid_sample``: plain torch ops (GridSample + 1x1 Conv). Exports with both exporters and runs in
  onnxruntime and OpenVINO.
- ``onnx_deformconv``: a ``torch.library`` custom op exported as the standard ONNX ``DeformConv``
  (opset >= 19). onnxruntime runs it; OpenVINO 2026.4 has no conversion rule for it.
- ``ascend_deformable_conv2d``: a custom op exported as the non-standard ``DeformableConv2D`` node
  that the seed's Ascend graph contains (spec §b): inputs (x, weight, offset27) with offset27 =
  [nine x offsets, nine y offsets, nine ones as a DCNv2 mask]. Only Ascend ATC, with the CANN
  ``DeformableConv2D`` operator, can consume it; nothing here runs it. We emit it in the custom
  domain ``ascend`` so the file passes ``onnx.checker``. The seed exported it without a domain
  (TorchScript of torch 1.8, checker off), and ATC's ONNX parser takes it from the default domain
  only (CANN registers DeformableConv2D under ai.onnx, opsets 9..16; two imported domains make it
  refuse default-domain nodes, E16005): the OM boundary moves it there with the
  ``custom_ops_to_default_domain`` rewrite that baselines/dekr.yaml's om: section names.

All three compute the same values in torch eager; the custom ops run the ``grid_sample`` body.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import onnx
import torch
import torch.nn.functional as F
from torch import nn

DeformVariant = Literal["grid_sample", "onnx_deformconv", "ascend_deformable_conv2d"]
DEFORM_VARIANTS: tuple[str, ...] = get_args(DeformVariant)
Exporter = Literal["dynamo", "torchscript"]

# Smallest opset at which each variant's graph is valid: GridSample needs 16, DeformConv 19; the
# Ascend graph exports at the seed's opset 11 with the TorchScript exporter.
MIN_OPSET: dict[str, int] = {
    "grid_sample": 16,
    "onnx_deformconv": 19,
    "ascend_deformable_conv2d": 11,
}
ASCEND_DOMAIN = "ascend"
ASCEND_DOMAIN_VERSION = 1
_ASCEND_OP_TYPE = "DeformableConv2D"

_OP_NAMESPACE = "zoo_dekr"
_KERNEL = 3
_TAPS = _KERNEL * _KERNEL


def _sampling_grid(offset: torch.Tensor) -> torch.Tensor:
    """(N, 18, H, W) offsets -> grid_sample grid (N, 9*H, W, 2) holding the nine taps stacked on rows.

    One GridSample call for all taps keeps the exported graph small (9x fewer nodes).
    """
    height, width = offset.shape[-2:]
    displacement = offset.unflatten(1, (_TAPS, 2))  # (N, 9, 2, H, W): [dy, dx] per tap
    taps = torch.arange(_TAPS, device=offset.device)
    tap_dy = (torch.div(taps, _KERNEL, rounding_mode="floor") - 1).to(offset.dtype).view(1, _TAPS, 1, 1)
    tap_dx = (taps % _KERNEL - 1).to(offset.dtype).view(1, _TAPS, 1, 1)
    rows = torch.arange(height, device=offset.device).to(offset.dtype).view(1, 1, -1, 1)
    cols = torch.arange(width, device=offset.device).to(offset.dtype).view(1, 1, 1, -1)
    # The integer part is summed first so it stays exact; the fraction is then rounded once.
    sample_y = (rows + tap_dy) + displacement[:, :, 0]
    sample_x = (cols + tap_dx) + displacement[:, :, 1]
    grid_x = (2 * sample_x + 1) / width - 1
    grid_y = (2 * sample_y + 1) / height - 1
    return torch.stack([grid_x, grid_y], dim=-1).flatten(1, 2)


def deform_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Deformable 3x3 convolution (stride 1, padding 1) in torchvision's offset layout.

    ``mask`` (N, 9, H, W), when given, scales each tap's samples (DCNv2 modulation).
    """
    sampled = F.grid_sample(x, _sampling_grid(offset), mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.unflatten(2, (_TAPS, -1))  # (N, C, 9, H, W)
    if mask is not None:
        sampled = sampled * mask.unsqueeze(1)
    # A 1x1 conv over (channel, tap) pairs is the weighted sum of the deformable kernel.
    return F.conv2d(sampled.flatten(1, 2), weight.flatten(1)[:, :, None, None])


def _output_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@torch.library.custom_op(f"{_OP_NAMESPACE}::deform_conv3x3", mutates_args=())
def onnx_deform_conv3x3(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Custom-op wrapper so exporters see one opaque node they can map to ONNX DeformConv."""
    return deform_conv3x3(x, weight, offset)


@onnx_deform_conv3x3.register_fake
def _onnx_deform_conv3x3_fake(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return _output_like(x, weight)


def to_ascend_offset(offset: torch.Tensor) -> torch.Tensor:
    """Torchvision layout (dy, dx interleaved) -> Ascend layout [dx x9, dy x9, mask of ones x9]."""
    dy, dx = offset[:, 0::2], offset[:, 1::2]
    return torch.cat([dx, dy, torch.ones_like(dx)], dim=1)


def from_ascend_offset(offset27: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascend layout -> (torchvision-layout offset, mask)."""
    dx, dy, mask = offset27.split(_TAPS, dim=1)
    return torch.stack([dy, dx], dim=2).flatten(1, 2), mask


@torch.library.custom_op(f"{_OP_NAMESPACE}::ascend_deformable_conv2d", mutates_args=())
def ascend_deformable_conv2d(x: torch.Tensor, weight: torch.Tensor, offset27: torch.Tensor) -> torch.Tensor:
    """Real values for the Ascend node (the seed's placeholder returned random numbers)."""
    offset, mask = from_ascend_offset(offset27)
    return deform_conv3x3(x, weight, offset, mask)


@ascend_deformable_conv2d.register_fake
def _ascend_deformable_conv2d_fake(x: torch.Tensor, weight: torch.Tensor, offset27: torch.Tensor) -> torch.Tensor:
    return _output_like(x, weight)


class DeformConv3x3(nn.Module):
    """Bias-free 3x3 deformable conv whose only state is ``weight``, like torchvision's DeformConv2d."""

    def __init__(self, in_channels: int, out_channels: int, variant: DeformVariant = "grid_sample") -> None:
        super().__init__()
        if variant not in DEFORM_VARIANTS:
            raise ValueError(f"unknown deformable-conv variant {variant!r}; expected one of {DEFORM_VARIANTS}")
        self.variant = variant
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, _KERNEL, _KERNEL))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if self.variant == "onnx_deformconv":
            return onnx_deform_conv3x3(x, self.weight, offset)
        if self.variant == "ascend_deformable_conv2d":
            return ascend_deformable_conv2d(x, self.weight, to_ascend_offset(offset))
        return deform_conv3x3(x, self.weight, offset)

    def extra_repr(self) -> str:
        out_channels, in_channels = self.weight.shape[:2]
        return f"{in_channels}, {out_channels}, kernel_size=3, padding=1, variant={self.variant}"


# --- exporter hooks ----------------------------------------------------------------------------

def _ascend_deformable_conv2d_op() -> onnxscript.values.Op:
    """The Ascend node as an onnxscript Op.

    The dynamo exporter only emits ops that have an ONNX schema, so on first use this registers a
    minimal schema for it in the ``ascend`` domain (process-wide; ONNX has no other hook).
    """
    if not onnx.defs.has(_ASCEND_OP_TYPE, ASCEND_DOMAIN_VERSION, ASCEND_DOMAIN):
        ints, integer = onnx.defs.OpSchema.AttrType.INTS, onnx.defs.OpSchema.AttrType.INT
        onnx.defs.register_schema(onnx.defs.OpSchema(
            _ASCEND_OP_TYPE, ASCEND_DOMAIN, ASCEND_DOMAIN_VERSION,
            "Ascend CANN deformable convolution; offset = [dx x9, dy x9, mask x9].",
            inputs=[onnx.defs.OpSchema.FormalParameter(name, "T") for name in ("x", "weight", "offset")],
            outputs=[onnx.defs.OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
            attributes=[
                onnx.defs.OpSchema.Attribute("strides", ints),
                onnx.defs.OpSchema.Attribute("pads", ints),
                onnx.defs.OpSchema.Attribute("dilations", integer),
                onnx.defs.OpSchema.Attribute("groups", integer),
                onnx.defs.OpSchema.Attribute("deformable_groups", integer),
            ],
        ))
    import onnxscript  # only the dynamo export needs it (and its import takes seconds)

    opset = onnxscript.values.Opset(ASCEND_DOMAIN, ASCEND_DOMAIN_VERSION)
    schema = onnx.defs.get_schema(_ASCEND_OP_TYPE, ASCEND_DOMAIN_VERSION, ASCEND_DOMAIN)
    return onnxscript.values.Op(opset, _ASCEND_OP_TYPE, schema)


def _deformconv_onnxscript(x: Any, weight: Any, offset: Any) -> Any:
    from onnxscript import opset19  # only the dynamo export needs it (and its import takes seconds)

    return opset19.DeformConv(
        x, weight, offset, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1],
        group=1, offset_group=1,
    )


def _ascend_onnxscript(x: Any, weight: Any, offset27: Any) -> Any:
    return _ascend_deformable_conv2d_op()(
        x, weight, offset27, strides=[1, 1], pads=[1, 1], dilations=1, groups=1, deformable_groups=1
    )


def _deformconv_symbolic(g: Any, x: Any, weight: Any, offset: Any) -> Any:
    return g.op(
        "DeformConv", x, weight, offset, kernel_shape_i=[3, 3], pads_i=[1, 1, 1, 1], strides_i=[1, 1],
        dilations_i=[1, 1], group_i=1, offset_group_i=1,
    )


def _ascend_symbolic(g: Any, x: Any, weight: Any, offset27: Any) -> Any:
    output = g.op(
        f"{ASCEND_DOMAIN}::{_ASCEND_OP_TYPE}", x, weight, offset27, strides_i=[1, 1], pads_i=[1, 1],
        dilations_i=1, groups_i=1, deformable_groups_i=1,
    )
    # ONNX cannot infer a custom-domain op's shape; stating it keeps downstream shapes known.
    batch, _, height, width = x.type().varyingSizes()
    output.setType(x.type().with_sizes([batch, weight.type().varyingSizes()[0], height, width]))
    return output


@dataclass(frozen=True)
class _ExportHooks:
    """How each exporter turns a variant's custom op into its ONNX node."""

    op_name: str  # torch.library name, "namespace::name"
    onnxscript_translation: Callable[..., Any]  # dynamo: custom_translation_table entry
    torchscript_symbolic: Callable[..., Any]  # TorchScript: register_custom_op_symbolic
    custom_opsets: dict[str, int]

    @property
    def overload(self) -> torch._ops.OpOverload:
        namespace, name = self.op_name.split("::")
        return getattr(getattr(torch.ops, namespace), name).default


_EXPORT_HOOKS = {
    "onnx_deformconv": _ExportHooks(
        f"{_OP_NAMESPACE}::deform_conv3x3", _deformconv_onnxscript, _deformconv_symbolic, {}
    ),
    "ascend_deformable_conv2d": _ExportHooks(
        f"{_OP_NAMESPACE}::ascend_deformable_conv2d", _ascend_onnxscript, _ascend_symbolic,
        {ASCEND_DOMAIN: ASCEND_DOMAIN_VERSION},
    ),
}


def export_extras(variant: DeformVariant, exporter: Exporter, opset_version: int | None = None) -> dict[str, Any]:
    """Extra keyword arguments for ``torch.onnx.export`` that a model built with ``variant`` needs.

    Only the custom-op hooks: the caller still passes ``dynamo``, ``opset_version`` and the rest.
    ``opset_version``, when given, is checked against the variant's minimum. For the TorchScript
    exporter this also registers the variant's symbolic: a process-wide, idempotent side effect,
    since that exporter has no per-call hook for custom ops.
    """
    if variant not in DEFORM_VARIANTS:
        raise ValueError(f"unknown deformable-conv variant {variant!r}; expected one of {DEFORM_VARIANTS}")
    if exporter not in get_args(Exporter):
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {get_args(Exporter)}")
    if opset_version is not None and opset_version < MIN_OPSET[variant]:
        raise ValueError(f"variant {variant!r} needs opset >= {MIN_OPSET[variant]}, got {opset_version}")
    hooks = _EXPORT_HOOKS.get(variant)
    if hooks is None:
        return {}
    if exporter == "dynamo":
        return {"custom_translation_table": {hooks.overload: hooks.onnxscript_translation}}
    torch.onnx.register_custom_op_symbolic(hooks.op_name, hooks.torchscript_symbolic, MIN_OPSET[variant])
    return {"custom_opsets": hooks.custom_opsets} if hooks.custom_opsets else {}
