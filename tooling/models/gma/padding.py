"""Sintel-mode input padding (spec §5): replicate-pad H and W up to multiples of 8, split evenly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MULTIPLE = 8


@dataclass(frozen=True)
class InputPadder:
    """Pads (..., H, W) arrays to multiples of 8 and crops them back exactly."""

    height: int
    width: int

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """[left, right, top, bottom], the smaller half before the image."""
        pad_h = (MULTIPLE - self.height % MULTIPLE) % MULTIPLE
        pad_w = (MULTIPLE - self.width % MULTIPLE) % MULTIPLE
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    @property
    def padded_shape(self) -> tuple[int, int]:
        left, right, top, bottom = self.pads
        return self.height + top + bottom, self.width + left + right

    def pad(self, array: np.ndarray) -> np.ndarray:
        self._check(array.shape[-2:], (self.height, self.width), "pad")
        left, right, top, bottom = self.pads
        widths = [(0, 0)] * (array.ndim - 2) + [(top, bottom), (left, right)]
        return np.pad(array, widths, mode="edge")

    def unpad(self, array: np.ndarray) -> np.ndarray:
        self._check(array.shape[-2:], self.padded_shape, "unpad")
        left, _, top, _ = self.pads
        return array[..., top : top + self.height, left : left + self.width]

    @staticmethod
    def _check(actual, expected, what: str) -> None:
        if tuple(actual) != tuple(expected):
            raise ValueError(f"cannot {what} an array of spatial size {tuple(actual)}: expected {tuple(expected)}")
