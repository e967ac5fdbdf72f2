"""VideoPose3D through every gate (parametrized from baselines/videopose3d.yaml)."""
from tooling.conformance import ConformanceSuite


class TestVideoPose3D(ConformanceSuite):
    model = "videopose3d"
