"""Reading ``baselines/<model>.yaml`` into a ``ModelSpec``: the strict schema (tooling/schema.py)
and its cross-references first, against the backend registry's names, then parsing."""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tooling.backends import BACKENDS
from tooling.model_spec import (
    PROJECT_ROOT, AccuracySpec, ChainSpec, InputSpec, ModelSpec, ModelSpecError, NetworkSpec, Profile,
    ThroughputSpec, Tolerance, Variant,
)
from tooling.schema import reference_errors, schema_errors

# Overridable so a model can live outside this repository (and so the engine's own tests can
# add a throw-away model without touching the real baselines).
BASELINES_DIR = Path(os.environ.get("ZOO_BASELINES_DIR", PROJECT_ROOT / "baselines"))


def _require(raw: dict, key: str, where: str) -> Any:
    if key not in raw:
        raise ModelSpecError(f"{where}: missing required field {key!r}")
    return raw[key]


def _parse_inputs(raw: dict, where: str) -> tuple[InputSpec, ...]:
    return tuple(
        InputSpec(iname, tuple(spec["shape"]), spec.get("dtype", "float32"))
        for iname, spec in _require(raw, "inputs", where).items()
    )


def _parse_outputs(raw: dict, where: str) -> dict[str, Tolerance]:
    return {
        oname: Tolerance.parse(spec, f"{where}.outputs.{oname}")
        for oname, spec in _require(raw, "outputs", where).items()
    }


def _parse_chain(name: str, raw: dict, where: str, networks: dict[str, NetworkSpec]) -> ChainSpec:
    where = f"{where}: chains.{name}"
    members = tuple(_require(raw, "networks", where))
    unknown = [n for n in members if n not in networks]
    if len(members) < 2 or unknown:
        raise ModelSpecError(f"{where}: networks must name two or more of {sorted(networks)} (unknown: {unknown})")
    return ChainSpec(name, members, _parse_inputs(raw, where), _parse_outputs(raw, where))


def _parse_network(name: str, raw: dict, where: str) -> NetworkSpec:
    where = f"{where}: networks.{name}"
    inputs = _parse_inputs(raw, where)
    outputs = _parse_outputs(raw, where)
    opset = {str(k): int(v) for k, v in _require(raw, "opset", where).items()}
    exporter = raw.get("exporter", "torchscript")
    variants_raw = raw.get("variants") or {"default": {}}
    variants = tuple(
        Variant(
            vname,
            tuple(v["backends"]) if v and v.get("backends") else None,
            tuple(v["exporters"]) if v and v.get("exporters") else None,
            {str(k): int(o) for k, o in (v or {}).get("opset", {}).items()},
        )
        for vname, v in variants_raw.items()
    )
    checkpoint = raw.get("checkpoint", {})
    return NetworkSpec(
        name=name,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        default_exporter=exporter,
        variants=variants,
        checkpoint_files=tuple(checkpoint.get("files", ())),
        checkpoint_keys=tuple(checkpoint.get("state_keys", ())),
        goldens=tuple(raw.get("goldens", ())),
        decoded={
            dname: Tolerance.parse(spec, f"{where}.decoded.{dname}") for dname, spec in raw.get("decoded", {}).items()
        },
        om=raw.get("om", {}),
        dynamic_axes={k: {int(a): n for a, n in v.items()} for k, v in raw.get("dynamic_axes", {}).items()},
    )


def validate_baseline(raw: Any, where: str) -> None:
    """Raise ``ModelSpecError`` listing every unknown key, wrongly typed value and dangling name
    (tooling/schema.py) in a baseline, each with its key path, before any of it is used."""
    problems = schema_errors(raw)
    if not problems:
        problems = reference_errors(raw, BACKENDS)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ModelSpecError(f"{where}: {len(problems)} problem(s) in the baseline:\n  {shown}{more}")


def parse_model_spec(raw: dict[str, Any], where: str) -> ModelSpec:
    validate_baseline(raw, where)
    name = _require(raw, "model", where)
    networks = {n: _parse_network(n, r, where) for n, r in _require(raw, "networks", where).items()}
    profiles = {}
    for pname, p in _require(raw, "profiles", where).items():
        profiles[pname] = Profile(
            name=pname,
            dims={k: int(v) for k, v in p.get("dims", {}).items()},
            batch_sizes=tuple(int(b) for b in p.get("batch_sizes", raw.get("batch_sizes", [1]))),
            exporters=tuple(p["exporters"]) if p.get("exporters") else None,
            slow=bool(p.get("slow", False)),
            benchmark_rounds=int(p.get("benchmark_rounds", 10)),
            networks=tuple(p["networks"]) if p.get("networks") else None,
            exclude_backends=tuple(p.get("exclude_backends", ())),
            nightly_backends=tuple(p.get("nightly_backends", ())),
        )
    acc = raw.get("accuracy")
    accuracy = None
    if acc:
        accuracy = AccuracySpec(
            metric=_require(acc, "metric", f"{where}: accuracy"),
            target=float(_require(acc, "target", f"{where}: accuracy")),
            tolerance=float(acc.get("tolerance", 0.0)),
            higher_is_better=bool(_require(acc, "higher_is_better", f"{where}: accuracy")),
            reference=float(acc["upstream_reference"]) if "upstream_reference" in acc else None,
            data=tuple(acc.get("data", ())),
            profile=acc.get("profile", next(iter(profiles))),
            extra_targets={k: float(v["target"] if isinstance(v, dict) else v)
                           for k, v in acc.get("extra_targets", {}).items()},
            extra_rules={
                k: (bool(v.get("higher_is_better", acc["higher_is_better"])), float(v.get("tolerance", acc.get("tolerance", 0.0))))
                for k, v in acc.get("extra_targets", {}).items() if isinstance(v, dict)
            },
            agreement={k: float(v) for k, v in acc.get("agreement", {}).items()},
            agreement_samples=int(acc.get("agreement_samples", 4)),
            agreement_by_backend={key: {k: float(v) for k, v in bounds.items()}
                                  for key, bounds in (acc.get("agreement_by_backend") or {}).items()},
        )
    thr = _require(raw, "throughput", where)
    floors = {  # the schema has checked the profile names and their batch sizes
        str(device): {str(p): {int(b): float(v) for b, v in per_batch.items()} for p, per_batch in per_profile.items()}
        for device, per_profile in (thr.get("floors") or {}).items()
    }
    throughput = ThroughputSpec(
        unit=thr.get("unit", "fps"),
        items_per_call=tuple(thr.get("items_per_call", ["batch"])),
        floors=floors,
        cpu_speedup_vs_torch=float(thr.get("cpu_speedup_vs_torch", 1.0)),
    )
    backend_tolerances = {
        backend: {o: Tolerance.parse(t, f"{where}: backend_tolerances.{backend}.{o}") for o, t in outs.items()}
        for backend, outs in raw.get("backend_tolerances", {}).items()
    }
    return ModelSpec(
        name=name,
        title=raw.get("title", name),
        guide=raw.get("guide", ""),
        slice_module=raw.get("slice", f"tooling.models.{name}"),
        upstream=raw.get("upstream", {}),
        networks=networks,
        profiles=profiles,
        accuracy=accuracy,
        throughput=throughput,
        backend_tolerances=backend_tolerances,
        om=raw.get("om", {}),
        raw=raw,
        chains={n: _parse_chain(n, c, where, networks) for n, c in (raw.get("chains") or {}).items()},
    )


@cache
def load_model_spec(name: str) -> ModelSpec:
    path = BASELINES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(model_names()) or "none"
        raise ModelSpecError(f"{path}: no baseline for model {name!r} (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelSpecError(f"{path}: not valid yaml ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelSpecError(f"{path}: expected a mapping at the top level")
    spec = parse_model_spec(raw, str(path))
    if spec.name != name:
        raise ModelSpecError(f"{path}: declares model {spec.name!r}, expected {name!r}")
    return spec


def model_names() -> list[str]:
    return sorted(p.stem for p in BASELINES_DIR.glob("*.yaml"))
