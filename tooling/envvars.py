"""Positive numbers read from the suite's environment variables, with errors that name the variable."""
from __future__ import annotations

import os


def positive_from_env(name: str, default: float | None, unit: str) -> float | None:
    """The positive number in the environment variable ``name`` (``default`` if unset or empty)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number of {unit}") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: must be positive")
    return value
