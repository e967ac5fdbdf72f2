"""VideoPose3D slice: temporal lifting network, Human3.6M pipeline, MPJPE."""
from tooling.models.videopose3d.slice import SLICE

__all__ = ["SLICE"]
