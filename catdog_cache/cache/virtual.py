"""The index's datasets for plain h5py (schema 2): the live rows in logical order as virtual datasets over the
shards (`features`, `labels`, `paths`, `sha256`), and `source_rows`, each source's row count. A shard's own `source`
column indexes its own `sources` attribute, not the index's, so it cannot be mapped; the logical rows are sorted by
source, so a count per source says the same in O(sources) bytes and an append still rewrites no per-row data.
catdog-cache itself never reads these (a crafted index could map them anywhere): it opens the shards it lists."""

from __future__ import annotations

import h5py
import numpy as np

from .view import View

_BYTES = h5py.vlen_dtype(bytes)


def write_virtual(f: h5py.File, rel: str, names: list[str], view: View, dtype: str) -> None:
    """Add the virtual datasets to an index being written (`f`), one mapping per run of consecutive rows of one
    shard. `rel`: the shards folder's name, so the mappings are relative to the index (a moved folder still works);
    `names`: the shards the index lists, in order."""
    idx = view.index
    n, v, d = idx.shape
    layouts = {  # name -> (the layout, a shard row's shape, the fill value of unmapped rows)
        "features": (h5py.VirtualLayout(shape=(n, v, d), dtype=dtype), (v, d), 0),
        "labels": (h5py.VirtualLayout(shape=(n,), dtype=np.int8), (), -1),
        "paths": (h5py.VirtualLayout(shape=(n,), dtype=_BYTES), (), None),
        "sha256": (h5py.VirtualLayout(shape=(n,), dtype="S64"), (), None),
    }
    for i, r0, start, length in view.runs():
        name, rows = f"{rel}/{names[i]}", view.shard_rows[i]
        for column, (layout, shape, _) in layouts.items():
            layout[start : start + length] = h5py.VirtualSource(name, column, (rows, *shape))[r0 : r0 + length]
    for column, (layout, _, fill) in layouts.items():
        f.create_virtual_dataset(column, layout, fillvalue=fill)
    counts = np.bincount(np.asarray(idx.source, np.int64), minlength=len(idx.sources)) if n else \
        np.zeros(len(idx.sources), np.int64)  # [K] rows of each source, in the order of `sources`
    f.create_dataset("source_rows", data=counts.astype(np.int64))  # int64: np.repeat takes it as it is
