"""Passing verdicts stored under their key (``tooling/verdict_key.py``), so an unchanged gate is
reported again instead of recomputed.

An entry is ``<cache-dir>/verdicts/<model>/<key>.json``: the figures the gate recorded, the run and
commit that computed it, when, and the key's inputs (so a later miss can say what changed). It is
written to a private temporary file and renamed into place, so xdist workers and concurrent runs
only ever see whole entries; two processes storing the same key write the same verdict. An entry
carries the sha256 of its own body: one that does not parse, does not match its key or its
checksum is damaged, and the verdict is recomputed with the reason said. Only passes are stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tooling.cache import denied
from tooling.verdict_key import VerdictKey

DIRECTORY = "verdicts"
FORMAT = 1


@dataclass(frozen=True)
class CachedVerdict:
    """A stored pass: what it recorded and where it came from."""

    key: str
    nodeid: str
    results: list[dict]  # the gate's zoo_result records (figures)
    relabels: list[dict]  # zoo_relabel records (an oracle row names itself so)
    run: str
    commit: str
    stored_at: float  # epoch seconds
    seconds: float  # how long the original computation took
    inputs: dict = field(default_factory=dict)

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.stored_at

    def provenance(self) -> dict[str, Any]:
        """What a report says about a reused verdict."""
        return {"run": self.run, "commit": self.commit,
                "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.stored_at)),
                "seconds": round(self.seconds, 2)}


class DamagedEntry(ValueError):
    """An entry that cannot be trusted (the message says why); its verdict is recomputed."""


class VerdictCache:
    def __init__(self, cache_dir: Path):
        self.root = Path(cache_dir) / DIRECTORY

    def path(self, model: str, key: VerdictKey | str) -> Path:
        digest = key.digest if isinstance(key, VerdictKey) else key
        return self.root / model / f"{digest}.json"

    def load(self, model: str, key: VerdictKey) -> CachedVerdict | None:
        """The stored pass for ``key``, None when there is none; DamagedEntry when one is there
        but cannot be trusted."""
        path = self.path(model, key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DamagedEntry(f"{path}: unreadable ({exc.strerror or exc})") from None
        try:
            stored = json.loads(text)
        except ValueError as exc:
            raise DamagedEntry(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("entry"), dict):
            raise DamagedEntry(f"{path}: no entry object")
        entry = stored["entry"]
        if stored.get("sha256") != _checksum(entry):
            raise DamagedEntry(f"{path}: checksum does not match its content (edited or truncated)")
        if entry.get("format") != FORMAT:
            raise DamagedEntry(f"{path}: format {entry.get('format')!r}, expected {FORMAT}")
        if entry.get("key") != key.digest:
            raise DamagedEntry(f"{path}: holds key {entry.get('key')!r}, not {key.digest}")
        for result in entry.get("results") or []:
            pictures = result.get("pictures") if isinstance(result, dict) else None
            missing = [p for p in (pictures or {}).values() if not Path(p).is_file()]
            if missing:
                raise DamagedEntry(f"{path}: picture {missing[0]} is missing")
        try:
            return CachedVerdict(
                key=entry["key"], nodeid=str(entry["nodeid"]), results=_records(entry["results"]),
                relabels=_records(entry.get("relabels", [])), run=str(entry["run"]), commit=str(entry["commit"]),
                stored_at=float(entry["stored_at"]), seconds=float(entry["seconds"]), inputs=dict(entry["inputs"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedEntry(f"{path}: malformed entry ({type(exc).__name__}: {exc})") from None

    def store(self, model: str, key: VerdictKey, *, nodeid: str, results: list[dict], relabels: list[dict],
              run: str, seconds: float) -> Path | None:
        """Write the pass of ``key`` atomically; None (nothing stored) where the cache is read-only."""
        path = self.path(model, key)
        try:
            results = self._keep_pictures(path, results)
        except OSError as exc:
            if denied(exc):
                return None
            raise
        entry = {
            "format": FORMAT, "key": key.digest, "nodeid": nodeid, "results": results, "relabels": relabels,
            "run": run, "commit": commit_of_checkout(), "stored_at": time.time(), "seconds": seconds,
            "inputs": key.inputs,
        }
        # Round-trip through JSON first, so the checksum covers exactly what a reader will parse.
        entry = json.loads(json.dumps(entry, default=str))
        body = json.dumps({"sha256": _checksum(entry), "entry": entry}, indent=1, sort_keys=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if denied(exc):
                return None
            raise
        return path

    def discard(self, model: str, key: VerdictKey) -> None:
        self.path(model, key).unlink(missing_ok=True)

    @staticmethod
    def _keep_pictures(path: Path, results: list[dict]) -> list[dict]:
        """Results whose ``pictures`` (caption -> file, written to the test's tmp dir) point at
        copies kept next to the entry, so a reused row still shows them."""
        kept = []
        for result in results:
            pictures = result.get("pictures")
            if isinstance(pictures, dict) and pictures:
                folder = path.with_suffix(".pictures")
                folder.mkdir(parents=True, exist_ok=True)
                copies = {}
                for i, (caption, source) in enumerate(pictures.items()):
                    target = folder / f"{i}-{Path(source).name}"
                    shutil.copyfile(source, target)
                    copies[caption] = str(target)
                result = {**result, "pictures": copies}
            kept.append(result)
        return kept


def _checksum(entry: dict) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _records(value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise TypeError("records must be a list of objects")
    return value


@cache
def commit_of_checkout() -> str:
    """The project commit a verdict was computed at, ``+dirty`` with uncommitted changes (whose
    content the key covers anyway), or ``unknown`` outside a git checkout."""
    from tooling.model_spec import PROJECT_ROOT

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head[:12] + ("+dirty" if dirty else "")
