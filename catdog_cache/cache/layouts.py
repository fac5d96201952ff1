"""Other layouts of the same features, for the benchmark (bench.py) to measure the chosen one against."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .format import CHUNK_ROWS


def rewrite_features(src: Path, dst: Path, dtype: str = "float32", compression: str | None = None,
                     chunk_rows: int = CHUNK_ROWS) -> None:
    """Only `features`, in another layout: lets the benchmark justify the chosen one by measurement."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        ds = f["features"]
        out = g.create_dataset("features", shape=ds.shape, dtype=dtype, chunks=(chunk_rows, *ds.shape[1:]),
                               compression=compression)
        for s in range(0, ds.shape[0], 4096):
            out[s : s + 4096] = ds[s : s + 4096].astype(dtype)


def time_full_read(path: Path) -> float:
    """Seconds to read every feature row into float32 (the in-memory fit's load)."""
    import time

    t = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["features"][...].astype(np.float32, copy=False)
    return time.perf_counter() - t
