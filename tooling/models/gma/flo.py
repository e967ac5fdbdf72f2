"""The Middlebury ``.flo`` optical-flow format (Sintel's ground truth), read and written with NumPy.

Layout, little-endian: float32 magic 202021.25 (the bytes ``PIEH``), int32 width, int32 height,
then height x width x 2 float32 (u, v interleaved, row-major). Scalars are read explicitly, so
NumPy 2 (which refuses ``int()`` on 1-element arrays) works.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

MAGIC = np.float32(202021.25)
HEADER_BYTES = 12


class FloError(ValueError):
    """A .flo file is truncated, mislabelled or otherwise not what the format says."""


def _header_size(data: bytes, name: str | Path) -> tuple[int, int]:
    if len(data) < HEADER_BYTES:
        raise FloError(f"{name}: {len(data)} bytes, too short for a .flo header ({HEADER_BYTES} bytes)")
    magic = np.frombuffer(data, "<f4", count=1)[0]
    if magic != MAGIC:
        raise FloError(f"{name}: not a .flo file (magic {data[:4]!r}, expected b'PIEH' = {float(MAGIC)})")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", count=2, offset=4))
    if width <= 0 or height <= 0:
        raise FloError(f"{name}: header declares a {width} x {height} flow field")
    return width, height


def flo_size(path: str | Path) -> tuple[int, int]:
    """(width, height) a .flo file declares, from its 12-byte header alone."""
    try:
        with open(path, "rb") as handle:
            return _header_size(handle.read(HEADER_BYTES), path)
    except OSError as exc:
        raise FloError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def decode_flo(data: bytes, name: str | Path = "<bytes>") -> np.ndarray:
    """The (height, width, 2) float32 flow held by ``data``; errors name ``name``."""
    width, height = _header_size(data, name)
    expected = HEADER_BYTES + width * height * 2 * 4
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise FloError(f"{name}: {state}: {len(data)} bytes, a {width} x {height} field needs {expected}")
    values = np.frombuffer(data, "<f4", count=width * height * 2, offset=HEADER_BYTES)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:  # Sintel's ground truth is dense and finite: NaN would poison the end-point error
        raise FloError(f"{name}: {bad} of {values.size} flow values are NaN or Inf")
    return values.reshape(height, width, 2).astype(np.float32)


def encode_flo(flow: np.ndarray) -> bytes:
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"a .flo field is (height, width, 2), got {flow.shape}")
    height, width = flow.shape[:2]
    header = MAGIC.astype("<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    return header + np.ascontiguousarray(flow, dtype="<f4").tobytes()


def read_flo(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FloError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_flo(data, path)


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    data = encode_flo(flow)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
