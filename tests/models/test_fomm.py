"""FOMM taichi-256 (kp_detector + generator, chained) through every gate (parametrized from baselines/fomm.yaml)."""
from tooling.conformance import ConformanceSuite


class TestFOMM(ConformanceSuite):
    model = "fomm"
