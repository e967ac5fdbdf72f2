"""TransPose-R-A3 (seed 003): network port and evaluation settings on the shared COCO stack."""
from tooling.models.transpose.network import (
    ONNX_INPUT_NAME,
    ONNX_OUTPUT_NAME,
    TransPoseR,
    build_transpose_r,
    sine_position_embedding,
)
from tooling.models.transpose.processing import TRANSPOSE_R_TOPDOWN, evaluate_transpose_r
from tooling.models.transpose.slice import SLICE

__all__ = [
    "ONNX_INPUT_NAME",
    "ONNX_OUTPUT_NAME",
    "SLICE",
    "TRANSPOSE_R_TOPDOWN",
    "TransPoseR",
    "build_transpose_r",
    "evaluate_transpose_r",
    "sine_position_embedding",
]
