"""GMA optical flow (seed 002): network port, export variants, Sintel data and metric."""
from tooling.models.gma.correlation import SAMPLERS
from tooling.models.gma.flo import FloError, read_flo, write_flo
from tooling.models.gma.network import DEFAULT_ITERS, INPUT_NAMES, OUTPUT_NAME, RAFTGMA, build_gma
from tooling.models.gma.padding import InputPadder
from tooling.models.gma.slice import SLICE

__all__ = [
    "DEFAULT_ITERS", "FloError", "INPUT_NAMES", "InputPadder", "OUTPUT_NAME", "RAFTGMA", "SAMPLERS", "SLICE",
    "build_gma", "read_flo", "write_flo",
]
