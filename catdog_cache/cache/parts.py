"""Writing: crash-safe part files and their assembly into one cache.

Crash safety: extraction never writes into the cache. It writes small part files (same layout) into
`<cache>.parts/`, each to a temp name and renamed into place when complete, so a kill -9 loses at most the part in
progress. Assembly merges the cache and its parts into `<cache>.tmp` and renames it over the cache: every file under
a final name is always complete.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import fsync_dir, require_space, temp_beside, write_atomic
from .format import (
    CHUNK_ROWS,
    CLASS_MAP,
    SCHEMA_VERSION,
    UNKNOWN_STAT,
    Index,
    Provenance,
    Refresh,
    Rows,
    require_same,
    trusted,
    unknown_stats,
)
from .read import read_index

_BYTES = h5py.vlen_dtype(bytes)
_STR = h5py.string_dtype("utf-8")


def _write(f: h5py.File, prov: Provenance, sources: list[str], features: np.ndarray | tuple[int, ...],
           paths: list[bytes], source: np.ndarray, labels: np.ndarray, sha256: list[str],
           failed: list[tuple[int, bytes, str, str]], versions: dict[str, str], weights_path: str = "",
           incomplete: list[str] | None = None, stat: np.ndarray | None = None, failed_stat: np.ndarray | None = None,
           scan_ns: int = 0, refresh: Refresh | None = None) -> h5py.Dataset:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["scan_ns"] = np.int64(scan_ns)
    if incomplete:
        f.attrs["incomplete"] = json.dumps(incomplete)
    f.attrs["weights_path"] = weights_path
    f.attrs["provenance"] = prov.to_json()
    f.attrs["class_map"] = json.dumps(CLASS_MAP)
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
    f.create_dataset("stat", data=_stat_column(stat, len(paths)))
    g = f.create_group("failures")
    g.create_dataset("stat", data=_stat_column(failed_stat, len(failed)))
    g.create_dataset("source", data=np.array([x[0] for x in failed], dtype=np.uint16))
    g.create_dataset("paths", data=np.array([x[1] for x in failed], dtype=object), dtype=_BYTES)
    g.create_dataset("sha256", data=np.array([x[2] for x in failed], dtype="S64"))
    g.create_dataset("reasons", data=np.array([x[3] for x in failed], dtype=object), dtype=_STR)
    if refresh is not None and len(refresh):
        r = f.create_group("refresh")
        r.create_dataset("source", data=np.asarray(refresh.source, dtype=np.uint16))
        r.create_dataset("paths", data=np.array(refresh.paths, dtype=object), dtype=_BYTES)
        r.create_dataset("sha256", data=np.array(refresh.sha256, dtype="S64"))
        r.create_dataset("stat", data=_stat_column(refresh.stat, len(refresh)))
    return ds


def _stat_column(stat: np.ndarray | list | None, n: int) -> np.ndarray:
    """[n, 4] int64, unknown (-1) where the writer was given no stats (rows of a cache older than stats)."""
    if stat is None or len(stat) == 0:
        return unknown_stats(n)
    out = np.asarray(stat, dtype=np.int64).reshape(-1, 4)
    assert out.shape[0] == n, (out.shape, n)
    return out


def parts_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".parts")


def _parts_folder(cache: Path, create: bool = False) -> Path | None:
    """The parts folder, never through a symlink (a planted link would send parts, and their deletion, elsewhere)."""
    folder = parts_dir(cache)
    if folder.is_symlink():
        raise CacheError(f"{folder} is a symbolic link; refusing to write or delete parts through it (remove it)")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        return None
    return folder


def write_part(cache: Path, name: str, prov: Provenance, source: str, rows: Rows, versions: dict[str, str],
               feature_shape: tuple[int, ...], weights_path: str = "", scan_ns: int = 0) -> Path:
    """Write rows as one complete part file. The HDF5 image is built in memory and written with plain file I/O, so
    a full disk is an OSError we can report (HDF5 itself may crash on ENOSPC) and the temp file is removed.
    `scan_ns`: when this run started scanning `source` (rows.stat were taken after it); 0 leaves every stat racy."""
    folder = _parts_folder(cache, create=True)
    assert folder is not None
    feats = np.stack(rows.features) if rows.features else np.zeros((0, *feature_shape), np.float32)
    n = len(rows.paths)
    with h5py.File(f"{name}.h5", "w", driver="core", backing_store=False) as f:
        _write(f, prov, [source], feats, rows.paths, np.zeros(n, np.uint16), np.array(rows.labels, np.int8),
               rows.sha256, [(0, p, s, r) for p, s, r in
                             zip(rows.failed_paths, rows.failed_sha256, rows.failed_reasons, strict=True)], versions,
               weights_path, stat=np.array(rows.stat, np.int64), failed_stat=np.array(rows.failed_stat, np.int64),
               scan_ns=scan_ns, refresh=rows.refresh)
        f.flush()
        image = f.id.get_file_image()
    return write_atomic(folder / f"{name}.h5", image)


def list_parts(cache: Path) -> list[Path]:
    folder = _parts_folder(cache)
    if folder is None:
        return []
    for stale in folder.glob("*.tmp"):  # an unfinished part from a killed run: its rows are redone
        if not stale.is_dir():
            stale.unlink(missing_ok=True)
    return sorted(p for p in folder.glob("*.h5") if p.is_file() and not p.is_symlink())


def assemble(cache: Path, prov: Provenance, versions: dict[str, str], drop: set[tuple[str, bytes]] = frozenset(),
             block: int = 1024, dim: int = 4096, weights_path: str = "", incomplete: dict[str, bool] | None = None
             ) -> Index:
    """Merge the cache and its parts into one new file, renamed over the cache; then delete the parts.

    Later parts win over earlier ones and over the cache (a changed file's new row replaces the old one);
    keys in `drop` are removed. Memory stays bounded: rows are copied `block` at a time. `incomplete` marks
    (True) or clears (False) a source's "extraction interrupted" record; other sources keep theirs."""
    parts = list_parts(cache)
    inputs = ([cache] if cache.exists() else []) + parts
    where: dict[tuple[str, bytes], tuple[int, int, int, str]] = {}  # key -> (input, row, label, sha)
    failed: dict[tuple[str, bytes], tuple[str, str]] = {}
    # key -> trusted stat: each input's racy stats are forgotten here, as its own scan time says, so the merged
    # file needs one scan time only (the latest: every stat kept is older than its own scan, hence than that one)
    stats: dict[tuple[str, bytes], tuple[int, ...]] = {}
    scan_ns = 0
    feature_shape: tuple[int, ...] | None = None
    sources: list[str] = []
    marked: set[str] = set()
    for i, path in enumerate(inputs):
        idx = read_index(path)
        marked.update(idx.incomplete)
        require_same(idx.provenance, prov, str(path), "this run")
        weights_path = weights_path or idx.weights_path
        if feature_shape is not None and idx.shape[1:] != feature_shape:
            raise CacheError(f"{path} has features of shape {idx.shape[1:]}, the others {feature_shape}: refusing it")
        feature_shape = idx.shape[1:]
        for s in idx.sources:
            if s not in sources:
                sources.append(s)
        scan_ns = max(scan_ns, idx.scan_ns)
        assert idx.stat is not None and idx.failed_stat is not None
        for row, (key, lab, sha, st) in enumerate(zip(idx.keys(), idx.labels.tolist(), idx.sha256,
                                                      trusted(idx.stat, idx.scan_ns).tolist(), strict=True)):
            where[key] = (i, row, lab, sha)
            stats[key] = tuple(st)
            failed.pop(key, None)
        for (s, p, sha, reason), st in zip(idx.failed, trusted(idx.failed_stat, idx.scan_ns).tolist(), strict=True):
            key = (idx.sources[s], p)
            failed[key] = (sha, reason)
            stats[key] = tuple(st)
            where.pop(key, None)
        refresh = idx.refresh
        for s, p, sha, st in zip(refresh.source.tolist(), refresh.paths, refresh.sha256,
                                 trusted(refresh.stat, idx.scan_ns).tolist(), strict=True):
            key = (idx.sources[s], p)
            held = where[key][3] if key in where else failed[key][0] if key in failed else None
            if held == sha:  # vouches only for the content it hashed
                stats[key] = tuple(st)
    for key in drop:
        where.pop(key, None)
        failed.pop(key, None)
    if len(sources) > np.iinfo(np.uint16).max:
        raise CacheError(f"{cache} would hold {len(sources)} source folders; the schema allows 65,535")
    for s, flag in (incomplete or {}).items():
        if flag:
            marked.add(s)
            sources += [] if s in sources else [s]
        else:
            marked.discard(s)
    order = sorted(where, key=lambda k: (sources.index(k[0]), k[1]))
    src_id = {s: j for j, s in enumerate(sources)}
    n = len(order)
    shape = (n, *(feature_shape or (len(prov.views.split(",")), dim)))
    # The new file is written beside the old one before the rename: both must fit.
    cache.parent.mkdir(parents=True, exist_ok=True)
    require_space(cache.parent, int(np.prod(shape)) * np.dtype(prov.dtype).itemsize + 200 * n + 2**20, cache)
    handles: dict[int, h5py.File] = {}
    with temp_beside(cache) as tmp:
        try:
            with h5py.File(tmp, "w") as out:
                ds = _write(out, prov, sources, shape, [k[1] for k in order],
                            np.array([src_id[k[0]] for k in order], np.uint16),
                            np.array([where[k][2] for k in order], np.int8), [where[k][3] for k in order],
                            [(src_id[k[0]], k[1], v[0], v[1]) for k, v in sorted(failed.items())], versions,
                            weights_path, [s for s in sources if s in marked],
                            stat=np.array([stats.get(k, UNKNOWN_STAT) for k in order], np.int64),
                            failed_stat=np.array([stats.get(k, UNKNOWN_STAT) for k in sorted(failed)], np.int64),
                            scan_ns=scan_ns)
                for start in range(0, n, block):
                    keys = order[start : start + block]
                    buf = np.empty((len(keys), *shape[1:]), dtype=prov.dtype)  # [b, V, D]
                    by_input: dict[int, list[tuple[int, int]]] = {}
                    for j, k in enumerate(keys):
                        by_input.setdefault(where[k][0], []).append((j, where[k][1]))
                    for i, pairs in by_input.items():
                        if i not in handles:
                            if len(handles) >= 16:  # bounded number of open parts
                                handles.pop(next(iter(handles))).close()
                            handles[i] = h5py.File(inputs[i], "r")
                        rows = [r for _, r in pairs]
                        lo, hi = min(rows), max(rows) + 1
                        chunk = handles[i]["features"][lo:hi]  # one contiguous read: rows are sorted in both files
                        buf[[j for j, _ in pairs]] = chunk[[r - lo for r in rows]]
                    ds[start : start + len(keys)] = buf
        finally:
            for h in handles.values():
                h.close()
    for p in parts:
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parts_dir(cache).rmdir()
    fsync_dir(cache.parent)
    return read_index(cache)
