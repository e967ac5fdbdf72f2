"""``python -m tooling doctor``: is this host ready for the nightly OM gates?

What a new Ascend host gets wrong first is the toolchain, not the suite: ``atc`` not sourced,
the ``ais_bench`` / ``aclruntime`` wheels missing or built for another CANN, a driver whose
``npu-smi`` prints no device table, a Python package of the ``[npu]`` extra absent. Each check
here names what it found and, when something is missing, what to do; the exit status is 1 when any
required check fails, so a nightly job can run it first.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tooling.backends.atc import OmSettings, declares_om, toolkit_version
from tooling.backends.npu import probe_npus
from tooling.baseline import load_model_spec, model_names
from tooling.model_spec import PROJECT_ROOT, ModelSpecError

SET_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"  {'ok     ' if self.ok else 'MISSING'} {self.name:<12} {self.detail}"


def check_atc() -> Check:
    atc = shutil.which("atc")
    if atc is None:
        return Check("atc", False, f"not on PATH ({SET_ENV})")
    return Check("atc", True, f"{atc} (CANN {toolkit_version(atc)})")


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


def check_module(name: str, module: str, how: str) -> Check:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a wheel built for another CANN fails with OSError or RuntimeError
        return Check(name, False, f"cannot import {module} ({type(exc).__name__}: {exc}); {how}")
    return Check(name, True, f"{module} imports ({_distribution_version(name)})")


def ais_bench_generation(infer_session: type) -> str | None:
    """Which ais_bench the ``InferSession`` class comes from, by its timing accessor."""
    if callable(getattr(infer_session, "summary", None)):
        return "ait benchmark (summary(); exec_time_list entries are (start_ms, end_ms) pairs or ms)"
    if callable(getattr(infer_session, "sumary", None)):
        return "Ascend/tools (sumary(); exec_time_list entries are ms)"
    return None


def check_ais_bench() -> Check:
    how = "install the ais_bench wheel of the ait benchmark component (docs/nightly.md)"
    try:
        interface = importlib.import_module("ais_bench.infer.interface")
    except Exception as exc:  # noqa: BLE001
        return Check("ais_bench", False, f"cannot import ais_bench.infer.interface ({type(exc).__name__}: {exc}); {how}")
    generation = ais_bench_generation(getattr(interface, "InferSession", object))
    if generation is None:
        return Check("ais_bench", False, "InferSession has neither summary() nor sumary(): no per-call NPU times")
    return Check("ais_bench", True, f"{_distribution_version('ais_bench')}, {generation}")


def check_npus() -> Check:
    chips, reason = probe_npus()
    if not chips:
        return Check("npu-smi", False, reason)
    listed = "; ".join(f"device {c.device}: NPU {c.npu} chip {c.chip} {c.name} {c.health} {c.bus_id}" for c in chips)
    unhealthy = [c.device for c in chips if c.health.upper() != "OK"]
    if unhealthy:
        return Check("npu-smi", False, f"devices {unhealthy} are not healthy: {listed}")
    return Check("npu-smi", True, f"{len(chips)} chip(s), soc {chips[0].soc_version}: {listed}")


def npu_extra(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """The pinned requirements of pyproject's ``[npu]`` extra."""
    return list(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["npu"])


def check_requirement(pin: str) -> Check:
    name, _, wanted = pin.partition("==")
    try:
        found = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Check(name, False, f"not installed; pip install -e '.[npu]' (pins {pin})")
    if wanted and found != wanted:
        return Check(name, False, f"{found} installed, the [npu] extra pins {wanted}")
    return Check(name, True, found)


def check_om_sections() -> Check:
    """Every baseline's om: sections parse (the ATC settings the night will use)."""
    modes: list[str] = []
    try:
        for model in model_names():
            spec = load_model_spec(model)
            for network in spec.networks:
                if declares_om(spec, network):
                    modes.append(f"{model}/{network} {OmSettings.of(spec, network).precision_mode}")
    except ModelSpecError as exc:
        return Check("baselines", False, str(exc))
    return Check("baselines", True, "om: " + (", ".join(modes) or "none"))


CHECKS: tuple[Callable[[], Check], ...] = (
    check_atc,
    check_ais_bench,
    lambda: check_module("aclruntime", "aclruntime", "install the aclruntime wheel built for this CANN"),
    check_npus,
    check_om_sections,
)


def run_checks() -> list[Check]:
    return [check() for check in CHECKS] + [check_requirement(pin) for pin in npu_extra()]


def doctor(print_line: Callable[[str], None] = print) -> int:
    checks = run_checks()
    print_line("NPU host (Ascend OM backend):")
    for check in checks:
        print_line(check.line())
    missing = [c.name for c in checks if not c.ok]
    print_line("ready for the OM gates" if not missing else f"not ready: {', '.join(missing)}")
    return 1 if missing else 0
