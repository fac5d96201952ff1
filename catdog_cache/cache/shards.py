"""Writing a sharded cache (schema 2; its layout, and how it is read: shard_state.py): appending, adopting,
converting, compacting.

Extract writes its parts as shards (temp name + rename); finishing a run rewrites only the index (temp + rename),
O(shards) bytes. A shard on disk that the index does not list (a killed run's saved work) is adopted by the next
writer, in name order (names start with their creation time). A schema-1 cache becomes shard 0 on its first append:
hard-linked into the shards folder, then the index renamed over it, each step leaving a readable cache."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import fsync_dir, require_space, temp_beside
from .format import INDEX_SCHEMA, Index, Provenance
from .opening import open_h5
from .rowfile import write_rows
from .shard_state import SHARD_NAME, State, legacy_parts_dir, listed, shards_dir, shards_folder, state_view
from .validate import attr, file_index
from .view import Tombstone, View, shard_index
from .virtual import write_virtual

_BYTES = h5py.vlen_dtype(bytes)


def list_parts(cache: Path, clean: bool = True) -> list[Path]:
    """Shards on disk that the index does not list (saved work of a killed run, or of this run before it finishes),
    in creation order; also parts in the pre-schema-2 `.parts` folder. `clean` removes unfinished temp files."""
    _, state = listed(cache)
    known = set(state.names + state.retired) if state else set()
    found = []
    for legacy in (True, False):
        folder = shards_folder(cache, legacy=legacy)
        if folder is None:
            continue
        for p in folder.iterdir():
            if clean and p.name.endswith(".tmp") and not p.is_dir():  # an unfinished shard: its rows are redone
                p.unlink(missing_ok=True)
            elif SHARD_NAME.fullmatch(p.name) and p.name not in known and p.is_file() and not p.is_symlink():
                found.append(p)
    return sorted(found, key=lambda p: p.name)


def _convert(cache: Path, folder: Path) -> State:
    """A schema-1 cache becomes shard 0 in O(1): a hard link in the shards folder (the old file stays a valid
    cache until the index replaces it; a kill in between leaves the same file twice, one inode)."""
    with open_h5(cache) as f:
        idx = file_index(f, cache)
    st = os.stat(cache)
    target = folder / f"part-{st.st_mtime_ns:020d}-legacy.h5"  # older than any part written after it
    if not (target.exists() and os.path.samefile(target, cache)):
        target.unlink(missing_ok=True)
        try:
            os.link(cache, target)
        except OSError:  # no hard links here: a rename (a kill before the index leaves it to be adopted)
            os.rename(cache, target)
        fsync_dir(folder)
    return State(idx.provenance, (idx.shape[1], idx.shape[2]), list(idx.sources), [target.name], [idx.shape[0]],
                 [st.st_size], [], [], list(idx.incomplete), idx.weights_path)


def writer_state(cache: Path, prov: Provenance, dim: int = 4096) -> State:
    """The current state plus every unlisted shard, adopted (a writer holds the lock)."""
    folder = shards_folder(cache, create=True)
    schema, state = listed(cache)
    if schema == 1:
        state = _convert(cache, folder)
    state = state or State(prov, (len(prov.views.split(",")), dim))
    for p in list_parts(cache):
        if p.name in state.names:
            continue
        if p.parent != folder:  # a pre-schema-2 part: moved in, O(1)
            os.rename(p, folder / p.name)
        state.names.append(p.name)
        state.rows.append(None)
        state.sizes.append(None)
    if state.names and state.rows[0] is None:  # no index yet: the first shard decides the feature shape
        idx = shard_index(folder / state.names[0])
        state.feature_shape = (idx.shape[1], idx.shape[2])
    return state


def write_index(cache: Path, state: State, view: View, versions: dict[str, str]) -> None:
    """The index, written to a temp file and renamed over `cache`: O(shards + deletion records + runs)."""
    idx = view.index
    _, v, d = idx.shape
    with temp_beside(cache) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = INDEX_SCHEMA
        if idx.incomplete:
            f.attrs["incomplete"] = json.dumps(idx.incomplete)
        f.attrs["weights_path"] = idx.weights_path
        f.attrs["provenance"] = state.prov.to_json()
        f.attrs["class_map"] = json.dumps({c: i for i, c in enumerate(idx.classes)})  # the shards' merged classes
        f.attrs["sources"] = json.dumps(idx.sources)
        f.attrs["versions"] = json.dumps(versions)
        f.attrs["feature_shape"] = json.dumps([v, d])
        g = f.create_group("shards")
        g.create_dataset("names", data=np.array([s.encode() for s in state.names], dtype=object), dtype=_BYTES)
        g.create_dataset("rows", data=np.array(view.shard_rows, np.uint64))
        g.create_dataset("bytes", data=np.array(view.shard_bytes, np.uint64))
        src_id = {s: j for j, s in enumerate(idx.sources)}
        t = [x for x in state.tombstones if x.source in src_id]
        g = f.create_group("deleted")
        g.create_dataset("source", data=np.array([src_id[x.source] for x in t], np.uint16))
        g.create_dataset("paths", data=np.array([x.path for x in t], dtype=object), dtype=_BYTES)
        g.create_dataset("before", data=np.array([x.before for x in t], np.uint32))
        f.create_group("retired").create_dataset(
            "names", data=np.array([s.encode() for s in state.retired], dtype=object), dtype=_BYTES)
        write_virtual(f, shards_dir(cache).name, state.names, view, state.prov.dtype)  # for plain h5py


def _delete_retired(cache: Path, state: State) -> None:
    folder = shards_folder(cache)
    for name in state.retired:  # listed in the index as retired: ours to delete
        if folder is not None:
            (folder / name).unlink(missing_ok=True)
    if folder is not None:
        fsync_dir(folder)


def finish(cache: Path, prov: Provenance, versions: dict[str, str], drop: set[tuple[str, bytes]] = frozenset(),
           weights_path: str = "", incomplete: dict[str, bool] | None = None, dim: int = 4096) -> Index:
    """End a writer's run: adopt every unlisted shard, record deletions, rewrite the index. Never copies a row.
    `incomplete` marks (True) or clears (False) a source's "extraction interrupted" record."""
    state = writer_state(cache, prov, dim)
    state.tombstones += [Tombstone(s, p, len(state.names)) for s, p in sorted(drop)]
    marked = set(state.incomplete)
    for s, flag in (incomplete or {}).items():
        if flag:
            marked.add(s)
            state.sources += [] if s in state.sources else [s]
        else:
            marked.discard(s)
    state.incomplete = sorted(marked)
    state.weights_path = state.weights_path or weights_path
    view = state_view(cache, state, check_prov=False)
    try:
        state.sources = view.index.sources  # with the folders of adopted shards
        if state.retired:
            _delete_retired(cache, state)
            state.retired = []
        write_index(cache, state, view, versions)
    finally:
        view.close()
    with contextlib.suppress(OSError):
        legacy_parts_dir(cache).rmdir()
    return view.index


def remove_cache(cache: Path) -> None:
    """Delete a cache this run created: its index (or single file) and the shards it lists, nothing else."""
    schema, state = listed(cache)
    folder = shards_folder(cache)
    cache.unlink(missing_ok=True)
    if state and folder is not None:
        for name in state.names + state.retired:
            (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shards_dir(cache).rmdir()


def write_merged(out: Path, view: View, prov: Provenance, versions: dict[str, str], block: int = 1024) -> None:
    """Every live row of a view into one schema-1 file, `block` rows in memory at a time."""
    idx = view.index
    n = idx.shape[0]
    require_space(out.parent, int(np.prod(idx.shape)) * np.dtype(prov.dtype).itemsize + 200 * n + 2**20, out)
    with h5py.File(out, "w") as f:
        stat, failed_stat, scan_ns = idx.folded()  # each row's stat judged by its own shard's scan time
        ds = write_rows(f, prov, idx.sources, tuple(idx.shape), idx.paths, idx.source.astype(np.uint16), idx.labels,
                    idx.sha256, idx.failed, versions, idx.weights_path, idx.incomplete, idx.classes, stat=stat,
                    failed_stat=failed_stat, scan_ns=scan_ns)
        for lo in range(0, n, block):
            ds[lo : lo + block] = view.read(lo, lo + block, view=None, dtype=prov.dtype)  # [b, V, D]


def compact(cache: Path, versions: dict[str, str], single: bool = False) -> tuple[int, int]:
    """Merge every shard (and unlisted ones) into one new shard: new shard, then the new index (naming the old
    shards retired, so none is ever adopted again), then the old shards deleted. Returns (shards before, after).
    `single`: then that one shard is renamed over the index: a schema-1 file, movable alone. The caller holds the
    lock."""
    schema, _ = listed(cache)
    if schema == 0:
        raise CacheError(f"no cache at {cache}: run `catdog-cache extract DATA_DIR` first")
    if schema == 1 and not list_parts(cache, clean=False):
        return 1, 1  # a single file already
    with open_h5(cache) as f:
        prov = Provenance.from_json(attr(f, "provenance"), str(cache))
    state = writer_state(cache, prov)
    before = len(state.names)
    if before > 1 or state.tombstones or state.retired or single:  # single: the merged shard carries every attr
        view = state_view(cache, state, check_prov=False)
        folder = shards_folder(cache)
        assert folder is not None
        name = f"part-{time.time_ns():020d}-{os.getpid()}-compact.h5"
        try:
            with temp_beside(folder / name) as tmp:
                write_merged(tmp, view, state.prov, versions)
        finally:
            view.close()
        state = State(state.prov, state.feature_shape, view.index.sources, [name], [None], [None], [],
                      state.retired + state.names, view.index.incomplete, view.index.weights_path)
        merged = state_view(cache, state)
        try:
            write_index(cache, state, merged, versions)
            _delete_retired(cache, state)
            state.retired = []
            write_index(cache, state, merged, versions)
        finally:
            merged.close()
    if single and state.names:  # index + one shard -> that shard under the cache's name (one rename)
        os.replace(shards_dir(cache) / state.names[0], cache)
        with contextlib.suppress(OSError):
            shards_dir(cache).rmdir()
        fsync_dir(cache.parent)
    return before, 1
