"""Output comparison with per-output tolerances and a report that localises the worst element."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from tooling.model_spec import Tolerance


@dataclass(frozen=True)
class OutputStats:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    cosine: float
    worst_index: tuple[int, ...]
    worst_actual: float
    worst_expected: float
    violations: int
    tolerance: Tolerance
    atol: float  # the absolute bound applied (atol, or atol_of_max times the output's range)
    nonfinite_actual: int = 0  # NaN or Inf elements on each side
    nonfinite_expected: int = 0

    @property
    def nonfinite_violation(self) -> bool:
        return not self.tolerance.allow_nonfinite and (self.nonfinite_actual or self.nonfinite_expected) > 0

    @property
    def allowed_violations(self) -> int:
        return int(self.tolerance.max_fraction_out * math.prod(self.shape))

    @property
    def passed(self) -> bool:
        # Elements past the bound up to max_fraction_out pass, unless one of them is not finite.
        allowed = self.allowed_violations if math.isfinite(self.max_abs) else 0
        within = self.violations <= allowed and not self.nonfinite_violation
        return within and self.cosine >= self.tolerance.min_cosine

    def line(self) -> str:
        verdict = "ok  " if self.passed else "FAIL"
        nonfinite = (
            f"NaN/Inf in {self.nonfinite_actual} actual and {self.nonfinite_expected} expected elements "
            f"(the yaml does not allow_nonfinite for this output); "
            if self.nonfinite_violation else ""
        )
        return nonfinite + (
            f"{verdict} {self.name} {self.shape}: max_abs={self.max_abs:.3g} mean_abs={self.mean_abs:.3g} "
            f"p99_abs={self.p99_abs:.3g} max_rel={self.max_rel:.3g} cos={self.cosine:.7f} "
            f"worst@{self.worst_index}: got {self.worst_actual:.6g} want {self.worst_expected:.6g} "
            f"(atol={self.atol:.3g} rtol={self.tolerance.rtol:g}, {self.violations} elements out"
            + (f", {self.allowed_violations} allowed)" if self.tolerance.max_fraction_out else ")")
        )


class ComparisonError(AssertionError):
    pass


def compare_array(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> OutputStats:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        raise ComparisonError(f"{name}: shape {actual.shape} differs from expected {expected.shape}")
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    if a.size == 0:
        return OutputStats(name, expected.shape, 0, 0, 0, 0, 1.0, (), 0, 0, 0, tol, tol.atol)
    nonfinite = ~np.isfinite(a) | ~np.isfinite(e)
    with np.errstate(invalid="ignore"):  # Inf - Inf; such elements are set just below
        diff = np.abs(a - e)
    diff[nonfinite & (a != e) & ~(np.isnan(a) & np.isnan(e))] = np.inf
    diff[(np.isnan(a) & np.isnan(e)) | (a == e)] = 0.0
    rel = diff / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    # The combined bound keeps near-zero outputs (huge relative error, tiny absolute) from failing.
    finite = np.abs(e[np.isfinite(e)])
    atol = max(tol.atol, tol.atol_of_max * float(finite.max()) if finite.size else 0.0)
    excess = diff - (atol + tol.rtol * np.abs(e))
    if not tol.allow_nonfinite:
        excess[nonfinite] = np.inf  # matching NaNs are no agreement unless the yaml allows them
    worst = int(np.argmax(excess))
    with np.errstate(invalid="ignore", over="ignore"):  # Inf / Inf: a NaN cosine fails, as it must
        norm = np.linalg.norm(a) * np.linalg.norm(e)
        cosine = float(np.dot(a, e) / norm) if norm > 0 else float(np.array_equal(a, e))
    return OutputStats(
        name=name,
        shape=tuple(expected.shape),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        p99_abs=float(np.percentile(diff, 99, method="higher")),  # no interpolation across inf
        max_rel=float(rel.max()),
        cosine=cosine,
        worst_index=tuple(int(i) for i in np.unravel_index(worst, expected.shape)),
        worst_actual=float(a[worst]),
        worst_expected=float(e[worst]),
        violations=int(np.count_nonzero(excess > 0)),
        tolerance=tol,
        atol=atol,
        nonfinite_actual=int(np.count_nonzero(~np.isfinite(a))),
        nonfinite_expected=int(np.count_nonzero(~np.isfinite(e))),
    )


def compare_outputs(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], tolerances: Mapping[str, Tolerance]
) -> list[OutputStats]:
    missing = [n for n in tolerances if n not in actual]
    if missing:
        raise ComparisonError(f"outputs missing from the result: {missing} (got {sorted(actual)})")
    return [compare_array(n, actual[n], expected[n], tol) for n, tol in tolerances.items()]


def assert_outputs_match(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerances: Mapping[str, Tolerance],
    what: str,
) -> list[OutputStats]:
    stats = compare_outputs(actual, expected, tolerances)
    failed = [s for s in stats if not s.passed]
    if failed:
        detail = "\n  ".join(s.line() for s in stats)
        raise ComparisonError(f"{what}: {', '.join(s.name for s in failed)} out of tolerance\n  {detail}")
    return stats
