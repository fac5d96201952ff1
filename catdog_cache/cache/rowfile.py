"""Writing one file of rows: the schema-1 layout (format.py) in HDF5, the single writer of every single-file cache
and every shard (parts.write_part, assemble, shards.compact). validate.py checks each file against these types."""

from __future__ import annotations

import json

import h5py
import numpy as np

from .format import CAT_DOG, CHUNK_ROWS, SCHEMA_VERSION, STAT_WIDTH, Provenance, Refresh, unknown_stats

_BYTES = h5py.vlen_dtype(bytes)
_STR = h5py.string_dtype("utf-8")


def write_rows(f: h5py.File, prov: Provenance, sources: list[str], features: np.ndarray | tuple[int, ...],
               paths: list[bytes], source: np.ndarray, labels: np.ndarray, sha256: list[str],
               failed: list[tuple[int, bytes, str, str]], versions: dict[str, str], weights_path: str = "",
               incomplete: list[str] | None = None, classes: list[str] | tuple[str, ...] = CAT_DOG,
               stat: np.ndarray | None = None, failed_stat: np.ndarray | None = None, scan_ns: int = 0,
               refresh: Refresh | None = None) -> h5py.Dataset:
    """Write the schema-1 layout (format.py) into `f`, an open empty file: its attributes, the per-row columns, the
    failures and the refresh records, each of the exact type validate.py requires. `features`: the rows, or their
    shape (the dataset is created chunked and unwritten, for the caller to fill block by block). Returns it."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["scan_ns"] = np.int64(scan_ns)
    if incomplete:
        f.attrs["incomplete"] = json.dumps(incomplete)
    f.attrs["weights_path"] = weights_path
    f.attrs["provenance"] = prov.to_json()
    f.attrs["class_map"] = json.dumps({c: i for i, c in enumerate(classes)})  # label i means classes[i]
    f.attrs["sources"] = json.dumps(sources)
    f.attrs["versions"] = json.dumps(versions)
    shape = features if isinstance(features, tuple) else features.shape
    chunks = (min(CHUNK_ROWS, shape[0]), *shape[1:]) if shape[0] else None
    if isinstance(features, tuple):
        ds = f.create_dataset("features", shape=shape, dtype=prov.dtype, chunks=chunks)
    else:
        ds = f.create_dataset("features", data=features.astype(prov.dtype, copy=False), chunks=chunks)
    f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=_BYTES)
    f.create_dataset("source", data=np.asarray(source, dtype=np.uint16))
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int8))
    f.create_dataset("sha256", data=np.array(sha256, dtype="S64"))
    _write_stats(f, _stat_column(stat, len(paths)))
    g = f.create_group("failures")
    _write_stats(g, _stat_column(failed_stat, len(failed)))
    g.create_dataset("source", data=np.array([x[0] for x in failed], dtype=np.uint16))
    g.create_dataset("paths", data=np.array([x[1] for x in failed], dtype=object), dtype=_BYTES)
    g.create_dataset("sha256", data=np.array([x[2] for x in failed], dtype="S64"))
    g.create_dataset("reasons", data=np.array([x[3] for x in failed], dtype=object), dtype=_STR)
    if refresh is not None and len(refresh):
        r = f.create_group("refresh")
        r.create_dataset("source", data=np.asarray(refresh.source, dtype=np.uint16))
        r.create_dataset("paths", data=np.array(refresh.paths, dtype=object), dtype=_BYTES)
        r.create_dataset("sha256", data=np.array(refresh.sha256, dtype="S64"))
        _write_stats(r, _stat_column(refresh.stat, len(refresh)))
    return ds


def _write_stats(g: h5py.Group, stat: np.ndarray) -> None:
    """[n, STAT_WIDTH] stats as `stat` [n, 4] and `ctime` [n]: ctime joined later, and a catdog-cache that predates it
    reads `stat` as it always did (it opens no column it does not know)."""
    g.create_dataset("stat", data=np.ascontiguousarray(stat[:, :4]))
    g.create_dataset("ctime", data=np.ascontiguousarray(stat[:, 4]))


def _stat_column(stat: np.ndarray | list | None, n: int) -> np.ndarray:
    """[n, STAT_WIDTH] int64, unknown (-1) where the writer was given no stats (rows of a cache older than stats)."""
    if stat is None or len(stat) == 0:
        return unknown_stats(n)
    out = np.asarray(stat, dtype=np.int64).reshape(-1, STAT_WIDTH)
    assert out.shape[0] == n, (out.shape, n)
    return out
