"""FOMM (taichi-256) port: keypoint detector, generator, pose estimator, reconstruction metric."""
from tooling.models.fomm.network import KPDetector, OcclusionAwareGenerator, build_generator, build_kp_detector
from tooling.models.fomm.pose_estimator import PoseEstimator, build_pose_estimator
from tooling.models.fomm.slice import SLICE

__all__ = [
    "KPDetector",
    "OcclusionAwareGenerator",
    "PoseEstimator",
    "SLICE",
    "build_generator",
    "build_kp_detector",
    "build_pose_estimator",
]
