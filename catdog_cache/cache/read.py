"""Reading a validated cache (a single file or a sharded one): its index, all features, or features in blocks.
One reader, the View (view.py), used by every command: it opens the shards the index lists, never the index's
virtual datasets (those are for plain h5py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .format import CHUNK_ROWS, SCHEMA_VERSION, Index
from .opening import open_h5
from .packed_index import release_freed
from .shard_state import read_state, state_view
from .validate import schema_of
from .view import View, single_file


def read_index(path: str | os.PathLike[str]) -> Index:
    with open_cache(path) as (_, index):
        return index


@contextlib.contextmanager
def open_cache(path: str | os.PathLike[str], lean: bool = False) -> Iterator[tuple[View, Index]]:
    """One reader for index and features: a single file stays open; a sharded cache's shards are immutable and
    checked against the index (an append between two opens cannot misalign labels and features).
    lean: what fit needs, in tens of bytes a row (cache/packed_index.py): every column checked as always, the paths
    packed into one buffer, the sha256 and stat columns not read (index.sha256 raises if used; stats read as
    unknown)."""
    path = Path(path)
    with open_h5(path) as f:
        view = single_file(f, path, lean) if schema_of(f, path) == SCHEMA_VERSION else \
            state_view(path, read_state(f, path), lean=lean)
        if lean:
            release_freed()
        try:
            yield view, view.index
        finally:
            view.close()


def read_features(path: str | os.PathLike[str] | View, view: int | None = 0) -> np.ndarray:
    """All features as float32: [N, D] for one view, [N, V, D] for view=None."""
    with contextlib.ExitStack() as stack:
        reader = path if isinstance(path, View) else stack.enter_context(open_cache(path))[0]
        n = reader.rows
        out = np.empty((n, *reader.index.shape[1:]) if view is None else (n, reader.index.shape[2]), np.float32)
        for s in range(0, n, 4096):  # straight into `out`: a block array and a copy doubled the memory traffic
            reader.read(s, s + 4096, view, out=out[s : s + 4096])
        return out


class BlockReader:
    """Features in blocks of whole 64-row chunks of the logical rows, one block in memory at a time: for caches
    larger than memory. Reads through the caller's open reader (the one its index came from)."""

    def __init__(self, reader: View, block_rows: int, view: int = 0) -> None:
        self._reader = reader
        self.rows, self.dim = reader.rows, reader.index.shape[2]
        self.block_rows = max(CHUNK_ROWS, block_rows // CHUNK_ROWS * CHUNK_ROWS)  # whole chunks only
        self.blocks = -(-self.rows // self.block_rows)
        self.view = view
        self._current: tuple[int, np.ndarray] | None = None

    def block(self, b: int) -> np.ndarray:
        """[rows in block, D] float32; the previous block is released."""
        if self._current is None or self._current[0] != b:
            self._current = None  # free before reading the next one
            lo = b * self.block_rows
            self._current = (b, self._reader.read(lo, lo + self.block_rows, self.view))
        return self._current[1]
