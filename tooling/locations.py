"""Where staged things live, and a report of what is present and what is missing.

Layout below each root (one layout for every model, so a nightly host stages things once):

    <data-root>/<path from the yaml's accuracy.data>     e.g. coco/annotations/person_keypoints_val2017.json
    <weights-root>/<model>/<checkpoint file>               e.g. videopose3d/model_best.bin
    <upstream-root>/<checkout>/  (a clone)  or  <upstream-root>/<checkout>.git  (a bare mirror), one per
                             checkout the yaml's upstream names (the model's name, or <model>-<suffix>)
    <cache-dir>/               built artifacts, upstream checkouts, resumable accuracy passes
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tooling.model_spec import PROJECT_ROOT, ModelSpec
from tooling.sources import dependency_status, install_command, upstream_sources

ENV = {
    "data_root": "ZOO_DATA_ROOT",
    "weights_root": "ZOO_WEIGHTS_ROOT",
    "upstream_root": "ZOO_UPSTREAM_ROOT",
    "cache_dir": "ZOO_CACHE_DIR",
}
DEFAULT_CACHE = PROJECT_ROOT / ".zoo-cache"


@dataclass(frozen=True)
class Roots:
    data_root: Path | None
    weights_root: Path | None
    upstream_root: Path | None
    cache_dir: Path

    @classmethod
    def resolve(cls, **given: str | Path | None) -> "Roots":
        """Command-line values win over environment variables; the cache has a default."""
        values = {}
        for field, env in ENV.items():
            raw = given.get(field) or os.environ.get(env)
            values[field] = Path(raw).expanduser().resolve() if raw else None
        values["cache_dir"] = values["cache_dir"] or DEFAULT_CACHE
        return cls(**values)


@dataclass(frozen=True)
class StagedItem:
    kind: str  # data, checkpoint, upstream, python (a package the upstream code imports)
    what: str
    expected: str  # where it is expected, or how to install it
    found: bool
    required: bool = True  # whether its absence makes `stage --check` fail


def data_paths(spec: ModelSpec, roots: Roots) -> dict[str, Path]:
    """Accuracy inputs by their yaml name, resolved below the data root (which may be unset)."""
    if spec.accuracy is None:
        return {}
    base = roots.data_root or Path("<--data-root>")
    return {rel: base / rel for rel in spec.accuracy.data}


def checkpoint_candidates(spec: ModelSpec, network: str, roots: Roots) -> list[Path]:
    base = (roots.weights_root or Path("<--weights-root>")) / spec.name
    return [base / f for f in spec.networks[network].checkpoint_files]


def find_checkpoint(spec: ModelSpec, network: str, roots: Roots) -> Path | None:
    if roots.weights_root is None:
        return None
    return next((p for p in checkpoint_candidates(spec, network, roots) if p.is_file()), None)


def staged_inventory(spec: ModelSpec, roots: Roots) -> list[StagedItem]:
    items = []
    for name, path in data_paths(spec, roots).items():
        items.append(StagedItem("data", name, str(path), roots.data_root is not None and path.exists()))
    for network, net in spec.networks.items():
        if not net.checkpoint_files:
            continue
        candidates = checkpoint_candidates(spec, network, roots)
        found = find_checkpoint(spec, network, roots)
        items.append(
            StagedItem("checkpoint", network, str(found or " or ".join(map(str, candidates))), found is not None)
        )
    for source in upstream_sources(spec).values():
        clone, mirror = source.staged_paths(roots.upstream_root)
        found = roots.upstream_root is not None and (clone.is_dir() or mirror.is_dir())
        serves = f" ({', '.join(source.networks)})" if source.networks else ""
        items.append(
            StagedItem(
                "upstream",
                f"{source.name}: {source.what()}{serves}",
                str(clone if clone.is_dir() else mirror if mirror.is_dir() else f"{clone} (or {mirror.name})"),
                found,
                required=False,  # optional, but once staged its gate runs, so its packages must be there
            )
        )
        for status in dependency_status(source.requires):
            items.append(
                StagedItem(
                    "python", f"{status.requirement} (upstream {source.name} code)",
                    f"installed {status.installed}" if status.ok else install_command([status]), status.ok,
                    required=found,
                )
            )
    return items


def missing_accuracy_inputs(spec: ModelSpec, roots: Roots, *, checkpoints: bool = True) -> list[str]:
    """What must still be staged for the dataset accuracy gate, as exact paths (the dataset only
    when ``checkpoints`` is False: a run on seeded weights)."""
    missing = [
        f"{path}" for path in data_paths(spec, roots).values() if roots.data_root is None or not path.exists()
    ]
    for network, net in spec.networks.items() if checkpoints else ():
        if net.checkpoint_files and find_checkpoint(spec, network, roots) is None:
            missing.append(" or ".join(map(str, checkpoint_candidates(spec, network, roots))))
    return list(dict.fromkeys(missing))  # networks sharing one checkpoint file name it once
