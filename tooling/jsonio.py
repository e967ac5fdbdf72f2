"""Strict JSON for everything the suite writes: no bare ``NaN``/``Infinity`` tokens, ever.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no strict parser (JavaScript,
``jq``, Go, Rust serde) accepts, so one NaN figure would make a whole report unreadable. Here a
non-finite float becomes ``null`` and the document says where, so a reader can tell "no value"
from "the value was NaN":

    >>> to_json({"metrics": {"AP": float("nan")}})
    '{"metrics": {"AP": null}, "nonfinite": {"metrics.AP": "nan"}}'

The flag is a top-level ``nonfinite`` object mapping each replaced value's dotted path to what it
was (``nan``, ``inf``, ``-inf``). A top level that is not an object (a list of detections) cannot
hold the flag; ``strict_json`` then returns the paths for the caller to report. NumPy scalars and
arrays become plain numbers and lists; any other type is a TypeError unless a ``default``
converter is given (the report passes ``str``, as ``json.dumps(default=str)`` does).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

NONFINITE_KEY = "nonfinite"


Default = Callable[[Any], Any] | None


def strict_json(value: Any, default: Default = None) -> tuple[Any, dict[str, str]]:
    """(a copy of ``value`` made of plain JSON types with non-finite floats as None,
    {dotted path: "nan" | "inf" | "-inf"} of every value replaced)."""
    replaced: dict[str, str] = {}
    return _clean(value, "", replaced, default), replaced


def finite_or_none(value: Any) -> float | None:
    """A number as strict JSON and SQLite can hold it: NaN and infinities become None (null, NULL)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _clean(value: Any, path: str, replaced: dict[str, str], default: Default) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v, f"{path}.{k}" if path else str(k), replaced, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}.{i}" if path else str(i), replaced, default) for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist(), path, replaced, default)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = finite_or_none(value)
        if number is None:
            replaced[path or "."] = "nan" if value != value else ("inf" if value > 0 else "-inf")
        return number
    if value is None or isinstance(value, str):
        return value
    if default is None:
        raise TypeError(f"{path or 'the value'}: a {type(value).__name__} is not JSON serializable")
    return _clean(default(value), path, replaced, None)


def to_json(value: Any, indent: int | None = None, default: Default = None) -> str:
    """Strict JSON text of ``value``; a top-level object gains the ``nonfinite`` flag when needed."""
    cleaned, replaced = strict_json(value, default)
    if replaced and isinstance(cleaned, dict):
        cleaned[NONFINITE_KEY] = replaced
    return json.dumps(cleaned, indent=indent, allow_nan=False)


def write_json(path: str | Path, value: Any, indent: int | None = 1, default: Default = None) -> Path:
    """Write ``to_json(value)`` atomically (a private temporary file renamed into place), so a
    reader, or a run killed mid-write, never sees half a document."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(value, indent, default)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False, encoding="utf-8")
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
