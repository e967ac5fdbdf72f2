"""Longest first: xdist hands out tests by how long they took last time, so the long accuracy
passes and their shards start at once and the short tests fill the gaps around them.

Durations come from ``<cache>/durations.json`` (test id -> seconds of its last run, setup to
teardown), which the controller updates after each run; the cache is shared by a fleet, so every
host's measurements feed the next night's order. A test never measured is expected to take the
median of those that were (a shard: its whole pass's time divided by the shard count). Merge
items of sharded passes go last: they wait for their shards.
"""
from __future__ import annotations

import functools
import json
import os
import re
import statistics
import tempfile
from itertools import cycle
from pathlib import Path
from typing import Callable

from filelock import FileLock
from xdist.scheduler import LoadScheduling

from tooling.backends import BACKENDS
from tooling.baseline import model_names
from tooling.shards import Shard, parse_merge

DURATIONS = "durations.json"
_PARAMS = re.compile(r"^(?P<base>.*)\[(?P<params>[^\[\]]*)\]$")


def _split_params(nodeid: str) -> tuple[str, list[str]]:
    match = _PARAMS.match(nodeid)
    return (match.group("base"), match.group("params").split("-")) if match else (nodeid, [])


def is_merge(nodeid: str) -> bool:
    return any(parse_merge(p) is not None for p in _split_params(nodeid)[1])


class Durations:
    """Measured seconds per test id, kept in ``<cache>/durations.json``."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / DURATIONS
        self.known = self._read()
        self.measured: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: the order is only a hint
        return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}

    def add(self, nodeid: str, seconds: float) -> None:
        self.measured[nodeid] = self.measured.get(nodeid, 0.0) + seconds

    def save(self) -> None:
        """Merge this run's measurements into the file (another run may have written it meanwhile)."""
        if not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            merged = {**self._read(), **{k: round(v, 3) for k, v in self.measured.items()}}
            handle = tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".durations.", delete=False)
            with handle:
                json.dump(merged, handle, indent=0, sort_keys=True)
            os.replace(handle.name, self.path)

    def expected(self, nodeid: str) -> float:
        if nodeid in self.known:
            return self.known[nodeid]
        base, params = _split_params(nodeid)
        shards = [Shard.parse(p) for p in params]
        shard = next((s for s in shards if s is not None), None)
        if shard is not None:  # a shard never run: its pass's unsharded time, split
            whole = f"{base}[{'-'.join(p for p, s in zip(params, shards) if s is None)}]"
            if whole in self.known:
                return self.known[whole] / shard.count
        return statistics.median(self.known.values()) if self.known else _prior(params)

    def order(self, nodeids: list[str]) -> list[int]:
        """Indices of ``nodeids``, longest expected first (ties in collection order), merges last."""
        return sorted(range(len(nodeids)), key=lambda i: (is_merge(nodeids[i]), -self.expected(nodeids[i]), i))


def affinity(nodeid: str) -> str:
    """Tests of one module with the same parameters but for the backend (a case's onnx-vs-torch,
    deployed-vs-onnx and decoded-vs-torch rows on every backend; a model's agreement rows; one
    model's agreement-set probes) use the same exported graph, compiled artifacts and per-process
    torch references: one worker runs them, so the other never waits on their build locks or
    computes the same reference again. A test without parameters is its own group."""
    base, params = _split_params(nodeid)
    if not params:
        return nodeid
    joined = "-".join(params)
    backend = _row_backend(joined) or ""
    module, case = base.split("::", 1)[0], joined[:len(joined) - len(backend)].rstrip("-")
    model = case if case in _model_names() else _suite_model(module) if not case else None
    if model is not None:
        # A model's rows without a case (its agreement rows on every backend, its staged accuracy
        # passes) and the per-model tests elsewhere (``[dekr]``: the agreement-set probes) share
        # its agreement set, whose torch eager pass is the costliest thing a handle memoises: one
        # worker runs them back to back, so releasing the model between them never runs it twice.
        return f"model:{model}"
    return f"{module}[{case}]"


@functools.cache
def _model_names() -> frozenset[str]:
    return frozenset(model_names())


def _suite_model(module: str) -> str | None:
    """The model whose suite module (``tests/models/test_<model>.py``) ``module`` is, if any."""
    name = Path(module).stem.removeprefix("test_")
    return name if name in _model_names() else None


def _row_backend(joined_params: str) -> str | None:
    """The backend a test's parameter id ends with, if any."""
    return next((b for b in _BACKENDS_LONGEST_FIRST if joined_params == b or joined_params.endswith(f"-{b}")), None)


_BACKENDS_LONGEST_FIRST = sorted(BACKENDS, key=len, reverse=True)  # aoti-cuda before aoti


def _prior(params: list[str]) -> float:
    """With nothing measured yet (a fresh clone): a row on a backend that compiles an artifact
    (AOTInductor: tens of seconds) is expected to be long, so it starts first and its group with
    it; everything else keeps collection order."""
    backend = _row_backend("-".join(params))
    return 1.0 if backend is not None and BACKENDS[backend].needs_compile else 0.0


class LongestFirstScheduling(LoadScheduling):
    """xdist's load scheduling, handing out tests longest first and one at a time.

    xdist's own load scheduler sends consecutive chunks (the first worker gets the first few
    tests), which would put two long shards on one worker. Here every worker holds two tests (a
    worker runs a test once it knows the next one), dealt round-robin in the expected-duration
    order, and gets the next one as each finishes, together with the pending tests of its
    ``affinity`` group.
    """

    def __init__(self, config, log=None, expected: Callable[[list[str]], list[int]] | None = None):
        super().__init__(config, log)
        self._order = expected

    def schedule(self) -> None:
        if self.collection is not None:
            return super().schedule()  # a node joined later (a crashed one's replacement)
        self._affinity: list[str] = []
        if not self._check_nodes_have_same_collection():
            self.log("**Different tests collected, aborting run**")
            return
        self.collection = next(iter(self.node2collection.values()))
        self._affinity = [affinity(nodeid) for nodeid in self.collection]
        self.pending[:] = self._order(self.collection) if self._order else range(len(self.collection))
        if not self.collection:
            return
        nodes = cycle(self.nodes)
        for _ in range(min(len(self.pending), 2 * len(self.nodes))):
            self._send_tests(next(nodes), 1)
        if not self.pending:
            for node in self.nodes:
                node.shutdown()

    def _send_tests(self, node, num: int) -> None:
        """The next ``num`` tests and every pending test of their affinity groups, in order."""
        groups = {self._affinity[i] for i in self.pending[:num]}
        chosen = [i for i in self.pending if self._affinity[i] in groups]
        if chosen:
            taken = set(chosen)
            self.pending[:] = [i for i in self.pending if i not in taken]
            self.node2pending[node].extend(chosen)
            node.send_runtest_some(chosen)

    def check_schedule(self, node, duration: float = 0) -> None:
        if node.shutting_down:
            return
        if self.pending:
            missing = 2 - len(self.node2pending[node])
            if missing > 0:
                self._send_tests(node, missing)
        else:
            node.shutdown()
