"""Sharded dataset passes: one accuracy pass split into parts that different workers, devices or
hosts score at the same time, then merged into exactly the unsharded figures.

A slice lists its pass as samples (``ModelSlice.accuracy_samples``); a shard is a contiguous run
of them holding about ``1/count`` of the pass's units, so the split depends only on the sample
list. Each shard scores into its own run folder (owned by one process at a time, resumable on its
own) and, once every record is kept, writes ``done.json`` listing them. The merge reads every
shard's records back in sample order and hands them to ``ModelSlice.merge_records``: the same
records in the same order as an unsharded pass, so the same figures bit for bit. A shard that is
missing or has a damaged record is named, never dropped from the figure.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tooling.jsonio import write_json
from tooling.slice import Arrays, PassSample

DONE = "done.json"
_SHARD_ID = re.compile(r"^shard(\d+)of(\d+)$")
_MERGE_ID = re.compile(r"^merge(\d+)$")


class ShardIncomplete(RuntimeError):
    """A shard of a sharded pass is missing or damaged; the message names it and what to rerun."""


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index} of {self.count}: index must be within 1..{self.count}")

    @property
    def id(self) -> str:
        return f"shard{self.index}of{self.count}"

    @property
    def label(self) -> str:
        return f"shard {self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> "Shard | None":
        match = _SHARD_ID.match(text)
        return cls(int(match.group(1)), int(match.group(2))) if match else None


def merge_id(count: int) -> str:
    return f"merge{count}"


def parse_merge(text: str) -> int | None:
    match = _MERGE_ID.match(text)
    return int(match.group(1)) if match else None


def split(samples: list[PassSample], count: int) -> list[list[PassSample]]:
    """``count`` contiguous parts of about equal units (a clip of many frames weighs more); a part
    may be empty when there are fewer samples than parts."""
    if count < 1:
        raise ValueError(f"cannot split a pass into {count} shards")
    total = sum(s.units for s in samples)
    parts: list[list[PassSample]] = [[] for _ in range(count)]
    done = 0
    for sample in samples:
        # The part whose share of the units this sample's midpoint falls in.
        part = min(count - 1, int((done + sample.units / 2) * count / total)) if total else 0
        parts[part].append(sample)
        done += sample.units
    return parts


def ids_digest(samples: list[PassSample]) -> str:
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()[:16]


def write_done(folder: Path, shard: Shard, samples: list[PassSample], record_paths: dict[str, Path]) -> None:
    """Say that ``shard`` kept a record for each of its samples, with each record file's sha256."""
    write_json(folder / DONE, {
        "shard": shard.id, "ids": [s.id for s in samples],
        "records": {s.id: {"file": record_paths[s.id].name, "sha256": _sha256(record_paths[s.id])} for s in samples},
    })


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_shard(folder: Path, shard: Shard, samples: list[PassSample], what: str) -> list[Arrays]:
    """The records of a finished shard, in sample order; a shard that did not finish, lists other
    samples, or holds a missing or damaged record raises ``ShardIncomplete`` naming it. A damaged
    shard loses its ``done.json`` (its intact records stay), so rerunning it rescores only what is
    missing."""
    done_path = folder / DONE
    where = f"{shard.label} of {what} ({folder})"
    if not done_path.is_file():
        raise ShardIncomplete(f"{where} did not finish: no {DONE}; rerun that shard (it resumes from its records)")
    try:
        done = json.loads(done_path.read_text())
        listed, records = done["ids"], done["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        done_path.unlink(missing_ok=True)
        raise ShardIncomplete(f"{where}: {DONE} is damaged ({exc}); rerun that shard") from None
    expected = [s.id for s in samples]
    if listed != expected:
        raise ShardIncomplete(f"{where} scored other samples ({len(listed)} listed, {len(expected)} expected, "
                              f"first difference at {_first_difference(listed, expected)}); rerun it")
    loaded = []
    for sample_id in expected:
        entry = records.get(sample_id) or {}
        path = folder / "records" / str(entry.get("file", ""))
        problem = None
        if not entry or not path.is_file():
            problem = "missing"
        elif _sha256(path) != entry.get("sha256"):
            problem = "damaged (its sha256 differs from the one recorded when the shard finished)"
        else:
            try:
                with np.load(path, allow_pickle=False) as data:
                    loaded.append({k: data[k] for k in data.files})
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                problem = f"unreadable ({exc})"
        if problem:
            done_path.unlink(missing_ok=True)
            if path.is_file() and problem != "missing":
                path.unlink()
            raise ShardIncomplete(f"{where}: record {sample_id!r} ({path.name}) is {problem}; the figure is not "
                                  "computed without it: rerun that shard (it rescores only what is missing)")
    return loaded


def _first_difference(listed: list[str], expected: list[str]) -> str:
    for position, (a, b) in enumerate(zip(listed, expected)):
        if a != b:
            return f"position {position}: {a!r} vs {b!r}"
    return f"position {min(len(listed), len(expected))}"
