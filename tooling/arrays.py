"""Named arrays from .npz files (goldens and the like), with errors that name the file and the fault."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np


class ArrayFileError(ValueError):
    """An npz file is missing, unreadable (truncated, damaged, not npz) or lacks a required array."""


def read_arrays(path: Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (default: all) from the npz ``path``, every one read in full (so a
    damaged member fails its CRC-32 check here, not later), numeric, and never pickled objects."""
    path = Path(path)
    requested = names is not None
    names = list(names) if requested else None
    if not path.is_file():
        raise ArrayFileError(f"{path}: file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ArrayFileError(f"{path}: a single .npy array, expected an npz archive of named arrays")
        with loaded as data:
            names = data.files if names is None else names
            missing = [n for n in names if n not in data.files]
            if missing:
                raise ArrayFileError(f"{path}: lacks arrays {missing} (has {data.files})")
            arrays = {n: data[n] for n in names}
    except ArrayFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ArrayFileError(f"{path}: not a readable npz archive ({type(exc).__name__}: {exc})") from exc
    for name, array in arrays.items():
        numeric = np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        # Arrays asked for by name are data; others (read with names=None) may be text metadata.
        if not numeric and (requested or array.dtype.kind != "U"):
            raise ArrayFileError(f"{path}: array {name!r} has dtype {array.dtype}, expected numbers")
    return arrays
