"""TransPose-R-A3 through every gate (parametrized from baselines/transpose.yaml)."""
from tooling.conformance import ConformanceSuite


class TestTransPose(ConformanceSuite):
    model = "transpose"
