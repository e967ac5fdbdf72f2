"""What a model's spec means for each backend: which artifacts the yaml declares (network x
profile x batch x exporter x variant, and chains), which backend serves which of them, and the
tolerances each backend is held to.

This is the layer between the spec (tooling/model_spec.py, plain facts that import no backend)
and the gates (tooling/gates.py): it asks the backend registry whether a backend's artifact can
take a case's shape (an OM's --dynamic_dims gears) and which tolerance key its settings pick.
"""
from __future__ import annotations

import itertools

from tooling.backends import BACKENDS
from tooling.model_spec import EXPORTERS, Case, ChainCase, ModelSpec, Tolerance


def cases(spec: ModelSpec, *, exporters: tuple[str, ...] | None = None) -> list[Case]:
    """Every (network, profile, batch, exporter, variant) the yaml declares, smoke before slow."""
    result: list[Case] = []
    for profile in spec.profiles.values():
        for net in spec.networks.values():
            if profile.networks is not None and net.name not in profile.networks:
                continue
            wanted = profile.exporters or (net.default_exporter,)
            if exporters:
                wanted = tuple(e for e in wanted if e in exporters) or (
                    tuple(e for e in exporters if e in EXPORTERS)[:1]
                )
            for batch, exporter, variant in itertools.product(profile.batch_sizes, wanted, net.variants):
                if variant.exporters is not None and exporter not in variant.exporters:
                    continue
                result.append(Case(spec.name, net.name, profile.name, batch, exporter, variant.name, profile.slow))
    return sorted(result, key=lambda c: c.slow)


def case_runs_on(spec: ModelSpec, case: Case, backend: str, *, at_profile_shape: bool = True) -> bool:
    """Whether ``backend`` serves ``case``: its export variant runs there, its profile keeps it,
    and the backend's artifact can take the case's shape (an OM's --dynamic_dims gears).
    ``at_profile_shape=False`` leaves the shape out, for passes whose shapes come from the data
    (the accuracy pass picks DEKR's bucket per image)."""
    return (
        spec.networks[case.network].variant(case.variant).runs_on(backend)
        and spec.profiles[case.profile].runs_on(backend)
        and (not at_profile_shape or backend not in BACKENDS or BACKENDS[backend].serves(spec, case))
    )


def nightly_only(spec: ModelSpec, case: Case, backend: str, exporters: tuple[str, ...] | None = None) -> bool:
    """Whether ``backend``'s rows on ``case`` belong to the nightly tier (``slow``), and why not
    to the CPU tier:

    - the case's profile is slow (deploy shapes);
    - the profile lists the backend in ``nightly_backends``: a compile the CPU tier pays once at
      another profile of the network already (AOTInductor at a second shape);
    - the backend compiles the torch network, not an ONNX graph, and the case is another exporter
      than the network's default: it is the same artifact the default exporter's row checks in the
      CPU tier, there held to the other exporter's graph (itself held to torch by onnx-vs-torch);
      unless --exporter (``exporters``) chose the exporters, as for the speed gate's cases.
    """
    if case.slow or backend in spec.profiles[case.profile].nightly_backends:
        return True
    return compiles_torch(backend) and not exporters and case.exporter != spec.networks[case.network].default_exporter


def agreement_nightly_only(spec: ModelSpec, backend: str) -> bool:
    """Whether the agreement gate's row on ``backend`` belongs to the nightly tier: the backend
    compiles the torch network with its weights frozen in (AOTInductor), and the slice calibrates
    its agreement weights, so the row would compile the network a second time in the CPU tier
    (deployed-vs-onnx compiles it on seeded weights); a slice without calibration reuses that one
    package, and keeps its row in the CPU tier."""
    return compiles_torch(backend) and spec.load_slice().calibrates_agreement


def speedup_nightly_only(spec: ModelSpec, case: Case) -> bool:
    """Whether the speed-up gate's row on ``case`` belongs to the nightly tier: the CPU tier times
    each profile at its first batch size, the nightly at the others too (parity holds every batch
    size in the CPU tier: a second batch size of the same shape only repeats the ratio, at twice
    the cost per round)."""
    return case.slow or case.batch != spec.profiles[case.profile].batch_sizes[0]


def compiles_torch(backend: str) -> bool:
    """A deployed backend that compiles the torch network itself (its artifact ignores the exporter)."""
    return backend in BACKENDS and BACKENDS[backend].consumes == "torch" and BACKENDS[backend].deployed


def chain_cases(spec: ModelSpec) -> list[ChainCase]:
    """Each chain at every profile (and batch) that builds all of its networks."""
    result = []
    for chain in spec.chains.values():
        for profile in spec.profiles.values():
            if profile.networks is not None and not set(chain.networks) <= set(profile.networks):
                continue
            result += [ChainCase(chain.name, profile.name, b, profile.slow) for b in profile.batch_sizes]
    return sorted(result, key=lambda c: c.slow)


def chain_member(spec: ModelSpec, chain_case: ChainCase, network: str, backend: str,
                 exporters: tuple[str, ...] | None = None) -> Case | None:
    """The case of ``network`` in ``chain_case`` that ``backend`` serves (None if none does)."""
    return next((
        c for c in cases(spec, exporters=exporters)
        if (c.network, c.profile, c.batch) == (network, chain_case.profile, chain_case.batch)
        and case_runs_on(spec, c, backend)
    ), None)


def chain_runs_on(spec: ModelSpec, chain_case: ChainCase, backend: str) -> bool:
    return all(chain_member(spec, chain_case, n, backend) for n in spec.chains[chain_case.chain].networks)


def tolerance_key(spec: ModelSpec, network: str, backend: str) -> str:
    """The ``backend_tolerances`` key ``backend`` is held to for ``network`` (``om@force_fp16``,
    say); a name outside the registry is taken as a key itself."""
    return BACKENDS[backend].tolerance_key(spec, network) if backend in BACKENDS else backend


def agreement_bounds(spec: ModelSpec, backend: str) -> dict[str, float]:
    """Per agreement metric, how far ``backend`` may move it from torch eager: the yaml's
    ``accuracy.agreement``, with ``agreement_by_backend`` replacing the metrics it names for the
    tolerance key one of the model's networks holds ``backend`` to (``om@force_fp16``, else
    ``om``). The set runs every network, so where they hold it to different keys the loosest wins."""
    accuracy = spec.accuracy
    if accuracy is None:
        return {}
    replaced: dict[str, float] = {}
    for network in spec.networks:
        key = tolerance_key(spec, network, backend)
        entry = next((accuracy.agreement_by_backend[k] for k in (key, key.split("@", 1)[0])
                      if k in accuracy.agreement_by_backend), {})
        for name, bound in entry.items():
            replaced[name] = max(bound, replaced.get(name, bound))
    return {**accuracy.agreement, **replaced}


def tolerances(spec: ModelSpec, network: str, backend: str, *, decoded: bool = False) -> dict[str, Tolerance]:
    """Per output of ``network`` (raw, or decoded: what the task reports), the tolerance ``backend``
    is held to: its ``backend_tolerances`` entry where the yaml gives one, else the network's."""
    key = tolerance_key(spec, network, backend)
    if decoded:
        return {name: spec.decoded_tolerance(network, name, key) for name in spec.networks[network].decoded}
    return {name: spec.tolerance(network, name, key) for name in spec.networks[network].outputs}


def chain_tolerances(spec: ModelSpec, chain: str, backend: str) -> dict[str, Tolerance]:
    """Per chain output, the tolerance ``backend`` is held to; the chain's last network produces
    what the chain reports, so its precision settings pick the key."""
    key = tolerance_key(spec, spec.chains[chain].networks[-1], backend)
    return {name: spec.chain_tolerance(chain, name, key) for name in spec.chains[chain].outputs}
