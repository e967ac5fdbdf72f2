"""The strict schema of ``baselines/<model>.yaml``: every key a baseline may hold, and the names
its sections refer to each other by.

Two steps, both run by ``tooling.baseline.parse_model_spec`` before anything reads the yaml:

1. ``SCHEMA`` (JSON Schema, checked with ``jsonschema``): the shape. Every mapping whose keys are
   fixed lists them with ``additionalProperties: false``, so a typo such as ``exclude_backend:`` is
   an error naming the file and the key path (``profiles.smoke.exclude_backend``), not a silently
   ignored setting.
2. ``reference_errors``: names that must exist elsewhere: backends in the backend registry,
   exporters, profile, network, input, output and dim names.

To add a key: add it to the section below (``fields(...)`` for fixed keys, ``mapping(...)`` for
free-form names), then read it in ``baseline.py`` or where it is used; if it names something
defined elsewhere, add that check to ``reference_errors``.
"""
from __future__ import annotations

from typing import Any, Iterable

import jsonschema

EXPORTER_NAMES = ("torchscript", "dynamo")

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
NAME = {"type": "string", "minLength": 1}
DIM = {"anyOf": [INTEGER, NAME]}  # a fixed size, or a dim a profile sets (batch, frames, height)


def fields(properties: dict[str, Any], required: Iterable[str] = ()) -> dict[str, Any]:
    """A mapping with a fixed set of keys: any other key is an error."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def mapping(values: dict[str, Any], keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """A mapping from free-form names (networks, profiles, outputs, batch sizes) to ``values``."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": values}
    if keys is not None:
        schema["propertyNames"] = keys
    return schema


def list_of(items: dict[str, Any], min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": min_items}


TOLERANCE = fields(
    {"atol": NUMBER, "rtol": NUMBER, "min_cosine": NUMBER, "atol_of_max": NUMBER, "allow_nonfinite": BOOLEAN,
     "max_fraction_out": {"type": "number", "minimum": 0, "maximum": 1}},
    required=("atol", "rtol"),
)
OPSETS = mapping(INTEGER, keys={"enum": list(EXPORTER_NAMES)})

# The Ascend ATC settings: ``networks.<net>.om``, or a model-level ``om:`` whose keys every network's
# own section extends (a model-level section without ``output`` holds shared flags only and makes
# no network an OM). Read by OmSettings (tooling/backends/atc.py), which writes the ATC command.
OM = fields({
    # The OM file stem, a str.format template over the case's dims and {batch}
    # (tp_r_256x192_enc3_d256_h1024_mh8_bs{batch}); required once the sections are merged.
    "output": NAME,
    "input_format": {"anyOf": [STRING, {"type": "null"}]},  # --input_format (default NCHW); null: no flag
    "log": {"anyOf": [STRING, {"type": "null"}]},  # --log (default error); null: no flag
    # --precision_mode, always written (default force_fp16: ATC's own default for inference, what a
    # guide without the flag ran). Part of the artifact key; the OM's raw and decoded tolerances
    # are looked up as backend_tolerances."om@<mode>", then "om".
    "precision_mode": NAME,  # an ATC --precision_mode value; OmSettings checks which
    # ATC dynamic dims: one OM serves exactly these buckets (2..100 distinct, ATC's gear limits); the
    # named dims are written as -1 in --input_shape, each bucket lists one value per name in the
    # order of ``dims`` (the command writes them in the order of the -1s). Cases at other shapes
    # are not parametrized for om at all.
    "dynamic_dims": fields(
        {"dims": list_of(NAME, 1), "buckets": list_of(list_of(INTEGER, 1), 1)}, required=("dims", "buckets"),
    ),
    # Flags whose value is a config file: the suite writes ``content`` under ``name`` next to the
    # OM and passes --<flag>=<that path> (keep_dtype: {name: keep.cfg, content: "OpType::InstanceNorm\n"}).
    "files": mapping(fields({"name": NAME, "content": STRING}, required=("name", "content"))),
    "flags": mapping({"type": ["string", "number", "boolean"]}),  # any further --<flag>=<value>, verbatim
    # ONNX rewrites run in order on a copy of the export before ATC (ONNX_REWRITES in
    # tooling/backends/onnx_rewrites.py: onnxsim, int64_to_int32, custom_ops_to_default_domain).
    "onnx_rewrites": list_of(NAME),
})

NETWORK = fields(
    {
        "inputs": mapping(fields({"shape": list_of(DIM, 1), "dtype": NAME}, required=("shape",))),
        "outputs": mapping(TOLERANCE),
        "decoded": mapping(TOLERANCE),
        "exporter": {"enum": list(EXPORTER_NAMES)},
        "opset": OPSETS,
        # A variant with nothing to restrict is written `name: {}` or `name:` (null).
        "variants": mapping({
            **fields({"backends": list_of(NAME, 1), "exporters": list_of(NAME, 1), "opset": OPSETS}),
            "type": ["object", "null"],
        }),
        "checkpoint": fields({"files": list_of(NAME), "state_keys": list_of(NAME)}),
        # variant: the export variant that made the golden (default: the network's first)
        "goldens": list_of(fields({"file": NAME, "salt": STRING, "slow": BOOLEAN, "variant": NAME}, required=("file",))),
        "dynamic_axes": mapping(mapping(NAME, keys={"pattern": r"^[0-9]+$"})),
        "om": OM,
    },
    required=("inputs", "outputs", "opset"),
)

# Networks where one feeds the next: the slice's run_chain wires them from `inputs`; the chain
# gate compares `outputs` (what the task produces) between each deployed backend and torch eager.
CHAIN = fields(
    {
        "networks": list_of(NAME, 2),
        "inputs": mapping(fields({"shape": list_of(DIM, 1), "dtype": NAME}, required=("shape",))),
        "outputs": mapping(TOLERANCE),
    },
    required=("networks", "inputs", "outputs"),
)

PROFILE = fields({
    "dims": mapping(INTEGER),
    "batch_sizes": list_of(INTEGER, 1),
    "exporters": list_of(NAME, 1),
    "slow": BOOLEAN,
    "benchmark_rounds": {"type": "integer", "minimum": 1},
    "networks": list_of(NAME, 1),
    "exclude_backends": list_of(NAME),
    "nightly_backends": list_of(NAME),
})

ACCURACY = fields(
    {
        "metric": NAME,
        "target": NUMBER,
        "tolerance": NUMBER,
        "higher_is_better": BOOLEAN,
        "upstream_reference": NUMBER,
        "profile": NAME,
        "data": list_of(NAME),
        # metric -> target (the main metric's direction and tolerance), or a mapping with its own
        "extra_targets": mapping({"anyOf": [NUMBER, fields(
            {"target": NUMBER, "higher_is_better": BOOLEAN, "tolerance": NUMBER}, required=("target",))]}),
        # The network-in-the-loop agreement gate: metric -> largest |deployed - torch eager| on the
        # first `agreement_samples` samples of the known-answer set, seeded weights.
        "agreement": mapping({"type": "number", "minimum": 0}),
        # backend tolerance key (as in backend_tolerances) -> metric -> bound, replacing agreement's
        "agreement_by_backend": mapping(mapping({"type": "number", "minimum": 0})),
        "agreement_samples": {"type": "integer", "minimum": 1},
    },
    required=("metric", "target", "higher_is_better"),
)

THROUGHPUT = fields(
    {
        "unit": NAME,
        "items_per_call": list_of(NAME, 1),
        # device class (310P3, T4, ...) -> profile (the shape the guide measured) -> batch size ->
        # minimum rate in `unit`; a shape the guide did not measure has no floor
        "floors": mapping(mapping(mapping(NUMBER, keys=INTEGER), keys=NAME), keys={"type": ["string", "integer"]}),
        "cpu_speedup_vs_torch": NUMBER,
    },
)

UPSTREAM = fields(
    {
        "repository": STRING,
        "commit": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
        "requires": list_of(NAME),  # packages upstream code imports, pinned in pyproject's [upstream] extra
        "networks": list_of(NAME, 1),  # built from this checkout; default: every network no other one lists
    },
    required=["commit"],
)

SCHEMA = fields(
    {
        "model": NAME,
        "title": STRING,
        "guide": STRING,
        "slice": NAME,
        # checkout name (the model's, or <model>-<suffix>) -> one upstream repository at a pinned commit
        "upstream": mapping(UPSTREAM, keys={"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"}),
        "networks": mapping(NETWORK),
        "chains": mapping(CHAIN),
        "profiles": mapping(PROFILE),
        "batch_sizes": list_of(INTEGER, 1),  # default for profiles that do not list their own
        "backend_options": mapping(mapping({}), keys=NAME),  # backend -> its own tuning keys
        # backend -> output or decoded name -> tolerance; "om@force_fp16" holds the OM's at one
        # ATC precision mode (Backend.tolerance_key), falling back to "om"
        "backend_tolerances": mapping(mapping(TOLERANCE)),
        "accuracy": ACCURACY,
        "throughput": THROUGHPUT,
        "om": OM,  # defaults for every network's om section
    },
    required=("model", "networks", "profiles", "throughput"),
)
# Every schema here is itself valid JSON Schema: a mistake in this file fails at import.
jsonschema.Draft202012Validator.check_schema(SCHEMA)


def _key_path(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed), key=str)
        keys = ", ".join(f"{_key_path([*error.absolute_path, k])}" for k in unknown)
        return f"unknown key {keys} (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        missing = error.message.split(" is a required property")[0]
        return f"{where}: missing required field {missing}" if error.absolute_path else f"missing required field {missing}"
    if "propertyNames" in error.relative_schema_path:
        return f"{where}: key {error.instance!r} is not allowed here ({error.message})"
    if error.validator in ("anyOf", "oneOf"):
        # Name the closest alternative's complaint rather than "is not valid under any of".
        best = jsonschema.exceptions.best_match(error.context) if error.context else None
        return _describe(best) if best is not None else f"{where}: {error.message}"
    return f"{where}: {error.message}"


def schema_errors(raw: Any) -> list[str]:
    """Every place where ``raw`` breaks ``SCHEMA``, as ``key.path: what is wrong``."""
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe(e) for e in errors]


def reference_errors(raw: dict[str, Any], backend_names: Iterable[str]) -> list[str]:
    """Names one section uses that another must define. ``raw`` has passed ``SCHEMA`` already."""
    backends = set(backend_names)
    problems: list[str] = []

    def check(names: Iterable[str], known: Iterable[str], where: str, what: str) -> None:
        known = set(known)
        for name in names:
            if name not in known:
                problems.append(f"{where}: unknown {what} {name!r} (known: {', '.join(sorted(map(str, known)))})")

    networks: dict[str, Any] = raw.get("networks", {})
    profiles: dict[str, Any] = raw.get("profiles", {})
    all_outputs: set[str] = set()
    for net_name, net in networks.items():
        where = f"networks.{net_name}"
        inputs = net.get("inputs", {})
        outputs = net.get("outputs", {})
        all_outputs |= set(outputs) | set(net.get("decoded") or {})
        for vname, variant in (net.get("variants") or {}).items():
            variant = variant or {}
            check(variant.get("backends", ()), backends, f"{where}.variants.{vname}.backends", "backend")
            check(variant.get("exporters", ()), EXPORTER_NAMES, f"{where}.variants.{vname}.exporters", "exporter")
        variants = (net.get("variants") or {"default": {}}).keys()
        for k, golden in enumerate(net.get("goldens") or ()):
            check([golden["variant"]] if "variant" in golden else [], variants, f"{where}.goldens.{k}.variant", "variant")
        check(net.get("dynamic_axes", {}), [*inputs, *outputs], f"{where}.dynamic_axes", "input or output")
        symbolic = {d for i in inputs.values() for d in i["shape"] if isinstance(d, str)}
        dynamic = (net.get("om") or {}).get("dynamic_dims") or {}
        check(dynamic.get("dims", ()), symbolic, f"{where}.om.dynamic_dims.dims", "input dim")
    for chain_name, chain in (raw.get("chains") or {}).items():
        check(chain.get("networks", ()), networks, f"chains.{chain_name}.networks", "network")
        all_outputs |= set(chain.get("outputs") or {})
    for pname, profile in profiles.items():
        where = f"profiles.{pname}"
        check(profile.get("networks", ()), networks, f"{where}.networks", "network")
        check(profile.get("exporters", ()), EXPORTER_NAMES, f"{where}.exporters", "exporter")
        check(profile.get("exclude_backends", ()), backends, f"{where}.exclude_backends", "backend")
        check(profile.get("nightly_backends", ()), backends, f"{where}.nightly_backends", "backend")
    check(raw.get("backend_options", {}), backends, "backend_options", "backend")
    check([k.split("@", 1)[0] for k in raw.get("backend_tolerances", {})], backends, "backend_tolerances", "backend")
    for backend, outputs in raw.get("backend_tolerances", {}).items():
        check(outputs, all_outputs, f"backend_tolerances.{backend}", "output")
    upstreams: dict[str, Any] = raw.get("upstream") or {}
    listed: dict[str, str] = {}
    for up_name, up in upstreams.items():
        where = f"upstream.{up_name}"
        model = raw.get("model", "")
        if up_name != model and not up_name.startswith(f"{model}-"):
            problems.append(f"{where}: a checkout is named {model!r} or {model + '-<suffix>'!r} (its staging "
                            "directory under the upstream root must not collide with another model's)")
        check(up.get("networks", ()), networks, f"{where}.networks", "network")
        for net_name in up.get("networks", ()):
            if net_name in listed:
                problems.append(f"{where}.networks: {net_name!r} is already built from upstream.{listed[net_name]}")
            listed.setdefault(net_name, up_name)
    catch_all = [n for n, up in upstreams.items() if not up.get("networks")]
    if len(catch_all) > 1:
        problems.append(f"upstream: {', '.join(catch_all)} all omit networks: at most one checkout serves "
                        "the networks no other one lists")
    accuracy = raw.get("accuracy") or {}
    if "profile" in accuracy:
        check([accuracy["profile"]], profiles, "accuracy.profile", "profile")
    by_backend = accuracy.get("agreement_by_backend") or {}
    check([k.split("@", 1)[0] for k in by_backend], backends, "accuracy.agreement_by_backend", "backend")
    for key, bounds in by_backend.items():
        check(bounds, accuracy.get("agreement") or {}, f"accuracy.agreement_by_backend.{key}", "agreement metric")
    dims = {"batch"} | {d for p in profiles.values() for d in p.get("dims", {})}
    check(raw.get("throughput", {}).get("items_per_call", ()), dims, "throughput.items_per_call", "dim")
    default_batches = raw.get("batch_sizes", [1])
    for device, per_profile in (raw.get("throughput", {}).get("floors") or {}).items():
        where = f"throughput.floors.{device}"
        check(per_profile, profiles, where, "profile")
        for pname, per_batch in per_profile.items():
            batches = (profiles.get(pname) or {}).get("batch_sizes", default_batches)
            check(per_batch, batches, f"{where}.{pname}", "batch size (not one of the profile's)")
    return problems
