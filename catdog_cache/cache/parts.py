"""Writing rows: crash-safe part files (shards), and their assembly into one schema-1 file.

Crash safety: extraction never writes into an existing file. It writes small part files (the schema-1 layout) into
`<cache>.shards/`, each to a temp name and renamed into place when complete, so a kill -9 loses at most the part in
progress; shards.finish then lists them in the index. assemble merges a single-file cache and its parts into a temp
file renamed over the cache: every file under a final name is always complete.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import fsync_dir, temp_beside, write_atomic
from .format import CAT_DOG, INDEX_SCHEMA, Index, Provenance, Rows
from .read import read_index
from .rowfile import write_rows
from .shard_state import SHARD_NAME, State, legacy_parts_dir, listed, shards_dir, shards_folder
from .shards import list_parts, write_merged
from .view import Tombstone, merge, shard_index


def parts_dir(cache: Path) -> Path:
    """Where a run's parts go: the shards folder (a part is a shard the index does not list yet)."""
    return shards_dir(cache)


def write_part(cache: Path, name: str, prov: Provenance, source: str, rows: Rows, versions: dict[str, str],
               feature_shape: tuple[int, int], weights_path: str = "",
               classes: list[str] | tuple[str, ...] = CAT_DOG, scan_ns: int = 0) -> Path:
    """Write rows as one complete shard file. The HDF5 image is built in memory and written with plain file I/O, so
    a full disk is an OSError we can report (HDF5 itself may crash on ENOSPC) and the temp file is removed.
    `scan_ns`: when this run started scanning `source` (rows.stat were taken after it); 0 leaves every stat racy."""
    folder = shards_folder(cache, create=True)
    assert folder is not None
    if not SHARD_NAME.fullmatch(f"{name}.h5"):
        raise ValueError(f"not a shard name: {name!r}")
    feats = np.stack(rows.features) if rows.features else np.zeros((0, *feature_shape), np.float32)
    n = len(rows.paths)
    with h5py.File(f"{name}.h5", "w", driver="core", backing_store=False) as f:
        write_rows(f, prov, [source], feats, rows.paths, np.zeros(n, np.uint16), np.array(rows.labels, np.int8),
               rows.sha256, [(0, p, s, r) for p, s, r in
                             zip(rows.failed_paths, rows.failed_sha256, rows.failed_reasons, strict=True)], versions,
               weights_path, classes=classes, stat=np.array(rows.stat, np.int64),
               failed_stat=np.array(rows.failed_stat, np.int64), scan_ns=scan_ns, refresh=rows.refresh)
        f.flush()
        image = f.id.get_file_image()
    return write_atomic(folder / f"{name}.h5", image)


def assemble(cache: Path, prov: Provenance, versions: dict[str, str], drop: set[tuple[str, bytes]] = frozenset(),
             block: int = 1024, dim: int = 4096, weights_path: str = "", incomplete: dict[str, bool] | None = None
             ) -> Index:
    """Merge a single-file cache and its unlisted shards into one new schema-1 file, renamed over the cache; then
    delete those shards. (extract itself appends shards: shards.finish. This makes the one-file form, for tools
    and tests; a sharded cache is merged by shards.compact instead.)"""
    schema, _ = listed(cache)
    if schema == INDEX_SCHEMA:
        raise CacheError(f"{cache} is a sharded cache: merge it with `catdog-cache compact`")
    parts = list_parts(cache)
    state = State(prov, (len(prov.views.split(",")), dim))
    shards = ([cache] if schema else []) + parts
    for p in shards:
        state.names.append(p.name)
        state.rows.append(None)
        state.sizes.append(None)
    if shards:
        first = shard_index(shards[0])
        state.feature_shape = (first.shape[1], first.shape[2])
        state.sources, state.incomplete = list(first.sources), list(first.incomplete)
    state.tombstones = [Tombstone(s, p, len(shards)) for s, p in sorted(drop)]
    for s, flag in (incomplete or {}).items():
        if flag:
            state.incomplete.append(s)
            state.sources += [] if s in state.sources else [s]
        elif s in state.incomplete:
            state.incomplete.remove(s)
    state.weights_path = weights_path
    views = []
    for p in shards:  # a view over files in two folders: the cache, then the parts
        views.append((p, shard_index(p)))
    view = merge(views, state.sources, state.tombstones, prov, state.feature_shape,
                 weights_path or next((i.weights_path for _, i in views if i.weights_path), ""), state.incomplete,
                 cache, check_prov=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        with temp_beside(cache) as tmp:
            write_merged(tmp, view, prov, versions, block)
    finally:
        view.close()
    for p in parts:
        p.unlink(missing_ok=True)
    for legacy in (True, False):
        with contextlib.suppress(OSError):
            (legacy_parts_dir(cache) if legacy else shards_dir(cache)).rmdir()
    fsync_dir(cache.parent)
    return read_index(cache)
