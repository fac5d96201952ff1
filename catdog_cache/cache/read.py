"""Reading a validated cache: its index, all features, or features in blocks of whole chunks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from .format import CHUNK_ROWS, Index
from .validate import _index, open_h5


def read_index(path: str | os.PathLike[str]) -> Index:
    path = Path(path)
    with open_h5(path) as f:
        return _index(f, path)


@contextlib.contextmanager
def open_cache(path: str | os.PathLike[str]) -> Iterator[tuple[h5py.File, Index]]:
    """One handle for index and features: an append between two opens cannot misalign labels and features."""
    path = Path(path)
    with open_h5(path) as f:
        yield f, _index(f, path)


def read_features(path: str | os.PathLike[str] | h5py.File, view: int | None = 0) -> np.ndarray:
    """All features as float32: [N, D] for one view, [N, V, D] for view=None."""
    with contextlib.ExitStack() as stack:
        if isinstance(path, h5py.File):
            f = path
        else:
            f, _ = stack.enter_context(open_cache(path))
        ds = f["features"]
        out = np.empty(ds.shape if view is None else (ds.shape[0], ds.shape[2]), dtype=np.float32)
        if out.shape[0] == 0:
            return out
        if view is None:
            out[...] = ds[...]
        elif ds.dtype == np.float32 and ds.shape[1] == 1:
            ds.read_direct(out.reshape(ds.shape))  # no temporary copy for the common case
        else:
            for s in range(0, ds.shape[0], 4096):
                out[s : s + 4096] = ds[s : s + 4096, view, :]
        return out


class BlockReader:
    """Features in blocks of whole HDF5 chunks, one block in memory at a time: for caches larger than memory.
    Reads through the caller's open handle (the one its index came from)."""

    def __init__(self, f: h5py.File, block_rows: int, view: int = 0) -> None:
        self._ds = f["features"]
        self.rows, self.dim = self._ds.shape[0], self._ds.shape[2]
        self.block_rows = max(CHUNK_ROWS, block_rows // CHUNK_ROWS * CHUNK_ROWS)  # whole chunks only
        self.blocks = -(-self.rows // self.block_rows)
        self.view = view
        self._current: tuple[int, np.ndarray] | None = None

    def block(self, b: int) -> np.ndarray:
        """[rows in block, D] float32; the previous block is released."""
        if self._current is None or self._current[0] != b:
            self._current = None  # free before reading the next one
            lo = b * self.block_rows
            self._current = (b, self._ds[lo : lo + self.block_rows, self.view, :].astype(np.float32, copy=False))
        return self._current[1]
