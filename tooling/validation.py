"""What a dataset claims, checked before it is scored.

A file that parses is not yet valid: ids that repeat, boxes of negative size or a frame count
that disagrees with the flow count give a figure, silently wrong. Each reader collects every
problem of an input into one ``Problems`` (one line per problem: the record and what is wrong)
and raises its own error type naming the file, so a user fixes the whole dataset in one pass.

Where upstream's evaluation tolerates something (an extra image on disk, a non-person annotation),
the reader does the same and says so through ``tolerated``: a ``UpstreamTolerance`` warning, which
pytest lists once per run in its warnings summary and the report attaches to the row it belongs to.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, NoReturn

# Enough to fix a systematically broken file without burying the first lines in thousands more.
MAX_LISTED = 25


class UpstreamTolerance(UserWarning):
    """Input that upstream's evaluation accepts as it is; the suite does the same and says so."""


def tolerated(message: str) -> None:
    warnings.warn(message, UpstreamTolerance, stacklevel=2)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Problems:
    """Every problem found in one input (``source``: a file or folder), raised as one error."""

    def __init__(self, source: str | Path):
        self.source = source
        self.lines: list[str] = []

    def add(self, record: str, what: str) -> None:
        """``record`` names the entry (image id, clip, scene/frame); ``what`` says what is wrong."""
        self.lines.append(f"{record} {what}")

    def __bool__(self) -> bool:
        return bool(self.lines)

    def message(self) -> str:
        if len(self.lines) == 1:
            return f"{self.source}: {self.lines[0]}"
        listed = "".join(f"\n  {line}" for line in self.lines[:MAX_LISTED])
        more = f"\n  ... and {len(self.lines) - MAX_LISTED} more" if len(self.lines) > MAX_LISTED else ""
        return f"{self.source}: {len(self.lines)} problems{listed}{more}"

    def raise_as(self, error: type[Exception]) -> None:
        """Raise ``error`` listing every problem, if there is any."""
        if self.lines:
            exc = error(self.message())
            exc.problems = list(self.lines)  # type: ignore[attr-defined]
            raise exc

    def fail(self, error: type[Exception], record: str, what: str) -> NoReturn:
        """Add one more problem and raise: for a fault that stops the checks from going on."""
        self.add(record, what)
        self.raise_as(error)
        raise AssertionError("unreachable")
