"""Sharded caches (schema 2): immutable shard files plus a small index, appended in O(new rows), read in place.

  features.h5                 the index (schema_version 2), what users pass as --cache:
      attrs                   provenance, class_map, sources, versions, weights_path, incomplete (as schema 1),
                              feature_shape (JSON [V, D])
      shards/{names,rows,bytes}   the shards in order (later wins), with the row count and byte size of each:
                              checked on open, so a replaced or truncated shard is an error naming it
      deleted/{source,paths,before}   deletion records (--prune): that file's rows in shards [0, before) are gone
      retired/names           shards a compact replaced: deleted by the next writer, never adopted
      features, labels        virtual datasets over the live rows in logical order, source files named relative to
                              the index (a moved folder still works): for plain h5py. catdog-cache never reads them.
  features.h5.shards/NAME.h5  one shard: exactly the schema-1 layout (a schema-1 cache is a valid shard)

Extract writes its parts as shards (temp name + rename); finishing a run rewrites only the index (temp + rename),
O(shards) bytes. A shard on disk that the index does not list (a killed run's saved work) is adopted by the next
writer, in name order (names start with their creation time). A schema-1 cache becomes shard 0 on its first append:
hard-linked into the shards folder, then the index renamed over it, each step leaving a readable cache."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import fsync_dir, printable, require_space, temp_beside
from .chunk_reads import identity
from .format import INDEX_SCHEMA, MAX_SOURCES, SCHEMA_VERSION, Index, Provenance
from .rowfile import write_rows
from .validate import attr, file_index, index_column, open_h5, parse_classes, schema_of, vlen_bytes
from .view import Tombstone, View, merge, shard_index

SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.h5")  # a plain file name: no '/', no leading '.'
MAX_SHARDS = 1 << 20
_BYTES = h5py.vlen_dtype(bytes)


def shards_dir(cache: Path) -> Path:
    """Beside the file the cache name leads to: a symlinked cache's shards are where extract (which resolves the
    cache) wrote them."""
    cache = Path(cache).resolve()
    return cache.with_name(cache.name + ".shards")


def legacy_parts_dir(cache: Path) -> Path:
    """Where catdog-cache before schema 2 saved a run's parts; a killed run's parts there are still adopted."""
    cache = Path(cache).resolve()
    return cache.with_name(cache.name + ".parts")


def shards_folder(cache: Path, create: bool = False, legacy: bool = False) -> Path | None:
    """The shards folder, never through a symlink (a planted link would send shards, and their deletion, elsewhere)."""
    folder = legacy_parts_dir(cache) if legacy else shards_dir(cache)
    if folder.is_symlink():
        raise CacheError(f"{folder} is a symbolic link; refusing to read, write or delete shards through it "
                         "(remove it)")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        return None
    return folder


@dataclass
class State:
    """What an index records (or what a writer is about to record)."""

    prov: Provenance
    feature_shape: tuple[int, int]
    sources: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    rows: list[int | None] = field(default_factory=list)  # None: not yet recorded (a shard being adopted)
    sizes: list[int | None] = field(default_factory=list)
    tombstones: list[Tombstone] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    weights_path: str = ""
    classes: list[str] | None = None  # the index's class_map (None: a writer's state; merge decides)


def _names(ds: h5py.Dataset, path: Path, size: int) -> list[str]:
    vlen_bytes(ds, path, size)
    names = [bytes(x).decode("ascii", "replace") for x in ds[:]]
    for n in names:
        if not SHARD_NAME.fullmatch(n):
            raise CacheError(f"{path} lists a shard named {printable(n)!r}: shard names are plain file names inside "
                             "the shards folder; refusing a crafted index")
    return names


def read_state(f: h5py.File, path: Path) -> State:
    """Validate an index file (every field comes from a file that may be crafted) without opening any shard."""
    size = path.stat().st_size
    try:
        prov = Provenance.from_json(attr(f, "provenance"), str(path))
        sources = json.loads(attr(f, "sources"))
        if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources) or len(sources) > MAX_SOURCES:
            raise ValueError("sources is not a list of folders")
        incomplete = json.loads(attr(f, "incomplete")) if "incomplete" in f.attrs else []
        if not isinstance(incomplete, list) or not all(isinstance(x, str) and x in sources for x in incomplete):
            raise ValueError("incomplete is not a list of its source folders")
        classes = parse_classes(attr(f, "class_map"))
        shape = json.loads(attr(f, "feature_shape"))
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int for x in shape)
                and 1 <= shape[0] <= 16 and 1 <= shape[1] <= 1 << 20):
            raise ValueError("feature_shape is not [views, dim]")
        for g in ("shards", "deleted", "retired"):
            if g not in f or not isinstance(f.get(g, getlink=True), h5py.HardLink) or \
                    not isinstance(f[g], h5py.Group):
                raise ValueError(f"no {g} group")
        k = index_column(f["shards"], "names", path, None).shape[0]
        if k > MAX_SHARDS or k > size:
            raise ValueError(f"{k} shards declared")
        names = _names(f["shards"]["names"], path, size)
        rows = index_column(f["shards"], "rows", path, k)[:].tolist()
        sizes = index_column(f["shards"], "bytes", path, k)[:].tolist()
        t = index_column(f["deleted"], "paths", path, None).shape[0]
        if t > size:
            raise ValueError(f"{t} deletion records declared")
        vlen_bytes(f["deleted"]["paths"], path, size)
        t_src = index_column(f["deleted"], "source", path, t)[:].astype(np.int64)
        t_before = index_column(f["deleted"], "before", path, t)[:].astype(np.int64)
        t_paths = [bytes(p) for p in f["deleted"]["paths"][:]]
        r = index_column(f["retired"], "names", path, None).shape[0]
        if r > MAX_SHARDS:
            raise ValueError(f"{r} retired shards declared")
        retired = _names(f["retired"]["names"], path, size)
        weights_path = str(attr(f, "weights_path")) if "weights_path" in f.attrs else ""
    except CacheError:
        raise
    except (KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is a damaged cache index ({printable(str(e))}): delete it and extract again") \
            from None
    if len(set(names)) != len(names) or set(names) & set(retired):
        raise CacheError(f"{path} lists a shard twice; refusing a crafted index")
    if t and (t_src.min() < 0 or t_src.max() >= len(sources) or t_before.min() < 0 or t_before.max() > k):
        raise CacheError(f"{path} has deletion records pointing outside its folders or shards; refusing it")
    return State(prov, (shape[0], shape[1]), sources, names, rows, sizes,
                 [Tombstone(sources[s], p, b) for s, p, b in zip(t_src.tolist(), t_paths, t_before.tolist(),
                                                                 strict=True)],
                 retired, incomplete, weights_path, classes)


def state_view(cache: Path, state: State, check_prov: bool = True, lean: bool = False) -> View:
    """Open and validate every shard the state lists (sizes and row counts as recorded, same provenance and shape)
    and merge them. check_prov False: a writer's check (each shard against this run, naming both). lean: what fit
    reads (validate.file_index)."""
    folder = shards_folder(cache) if state.names else None
    if state.names and folder is None:
        raise CacheError(f"{shards_dir(cache)} is missing: {cache} lists {len(state.names)} shards there; restore "
                         "the folder beside it (move a cache with its .shards folder) or extract again")
    shards, sizes, ids = [], [], []
    for name, rows, size in zip(state.names, state.rows, state.sizes, strict=True):
        p = folder / name  # type: ignore[operator]
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise CacheError(f"shard {p} is missing: {cache} lists it; restore it or extract again into a new "
                             "cache") from None
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(f"shard {p} is not a regular file (a link?); refusing it")
        if size is not None and st.st_size != size:
            raise CacheError(f"shard {p} has {st.st_size} bytes, the index recorded {size}: it was replaced or "
                             "truncated; restore it or extract again into a new cache")
        idx = shard_index(p, st, lean)
        if rows is not None and idx.shape[0] != rows:
            raise CacheError(f"shard {p} holds {idx.shape[0]} rows, the index recorded {rows}: refusing it")
        shards.append((p, idx))
        sizes.append(st.st_size)
        ids.append(identity(st))
    view = merge(shards, state.sources, state.tombstones, state.prov, state.feature_shape,
                 state.weights_path or next((i.weights_path for _, i in shards if i.weights_path), ""),
                 state.incomplete, cache, check_prov, state.classes if check_prov else None, lean)
    view.shard_bytes, view.shard_ids = sizes, ids
    return view


def listed(cache: Path) -> tuple[int, State | None]:
    """(schema, state): (0, None) no cache, (1, None) a single file, (2, state) an index."""
    if not cache.exists():
        return 0, None
    with open_h5(cache) as f:
        if schema_of(f, cache) == SCHEMA_VERSION:
            return 1, None
        return 2, read_state(f, cache)


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
    n, v, d = idx.shape
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
        # for plain h5py: the live rows in logical order, one mapping per run (one per shard when sorted)
        feats = h5py.VirtualLayout(shape=(n, v, d), dtype=state.prov.dtype)
        labels = h5py.VirtualLayout(shape=(n,), dtype=np.int8)
        rel = shards_dir(cache).name
        for i, r0, start, length in view.runs():
            name, rows = f"{rel}/{state.names[i]}", view.shard_rows[i]
            feats[start : start + length] = h5py.VirtualSource(name, "features", (rows, v, d))[r0 : r0 + length]
            labels[start : start + length] = h5py.VirtualSource(name, "labels", (rows,))[r0 : r0 + length]
        f.create_virtual_dataset("features", feats, fillvalue=0)
        f.create_virtual_dataset("labels", labels, fillvalue=-1)


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
