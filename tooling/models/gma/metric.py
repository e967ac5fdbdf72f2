"""End-point error and the 1/3/5-pixel accuracies over every pixel of every pair (spec §6).

No validity or occlusion mask: all pixels count. Totals are kept as sums so per-pair records can
be stored and an interrupted pass resumed; the pass figures are pixel-weighted over all pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLDS = (1, 3, 5)


def endpoint_error(flow: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """Per-pixel EPE of a (2, H, W) prediction against (H, W, 2) ground truth (as read from .flo)."""
    flow = np.asarray(flow, np.float32)
    ground_truth = np.asarray(ground_truth, np.float32).transpose(2, 0, 1)
    if flow.shape != ground_truth.shape:
        raise ValueError(f"prediction {flow.shape} and ground truth {ground_truth.shape} differ in shape")
    return np.sqrt(((flow - ground_truth) ** 2).sum(axis=0))


@dataclass
class FlowErrorTotals:
    pixels: int = 0
    epe_sum: float = 0.0
    below: dict[int, int] | None = None

    def __post_init__(self):
        self.below = dict.fromkeys(THRESHOLDS, 0) if self.below is None else self.below

    @staticmethod
    def record(epe: np.ndarray) -> dict[str, np.ndarray]:
        """What one pair contributes, as arrays a ResultStore can hold."""
        epe = np.asarray(epe, np.float64)
        return {"pixels": np.int64(epe.size), "epe_sum": np.float64(epe.sum()),
                **{f"below_{t}": np.int64(np.count_nonzero(epe < t)) for t in THRESHOLDS}}

    def add(self, record: dict[str, np.ndarray]) -> None:
        self.pixels += int(record["pixels"])
        self.epe_sum += float(record["epe_sum"])
        for t in THRESHOLDS:
            self.below[t] += int(record[f"below_{t}"])

    def summary(self) -> dict[str, float]:
        """EPE in pixels and the fraction of pixels with EPE strictly below 1, 3 and 5."""
        if self.pixels == 0:
            raise ValueError("no pixels scored")
        return {"epe": self.epe_sum / self.pixels, **{f"{t}px": self.below[t] / self.pixels for t in THRESHOLDS}}
