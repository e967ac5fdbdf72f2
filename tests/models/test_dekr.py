"""DEKR HRNet-W32 through every gate (parametrized from baselines/dekr.yaml)."""
from tooling.conformance import ConformanceSuite


class TestDEKR(ConformanceSuite):
    model = "dekr"
