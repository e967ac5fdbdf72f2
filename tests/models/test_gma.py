"""GMA optical flow through every gate (parametrized from baselines/gma.yaml)."""
from tooling.conformance import ConformanceSuite


class TestGMA(ConformanceSuite):
    model = "gma"
