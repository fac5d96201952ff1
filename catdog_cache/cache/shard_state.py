"""Sharded caches (schema 2): immutable shard files plus a small index, appended in O(new rows), read in place.
This module reads one: where its shards live, its index validated into a State, the shards it lists opened into one
View. The writers (shards.py: append, adopt, convert, compact; parts.py) build on it.

  features.h5                 the index (schema_version 2), what users pass as --cache:
      attrs                   provenance, class_map, sources, versions, weights_path, incomplete (as schema 1),
                              feature_shape (JSON [V, D])
      shards/{names,rows,bytes}   the shards in order (later wins), with the row count and byte size of each:
                              checked on open, so a replaced or truncated shard is an error naming it
      deleted/{source,paths,before}   deletion records (--prune): that file's rows in shards [0, before) are gone
      retired/names           shards a compact replaced: deleted by the next writer, never adopted
      features, labels, paths, sha256   virtual datasets over the live rows in logical order, source files named
                              relative to the index (a moved folder still works), and source_rows (each source's row
                              count): for plain h5py (virtual.py). catdog-cache never reads them.
  features.h5.shards/NAME.h5  one shard: exactly the schema-1 layout (a schema-1 cache is a valid shard)"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import printable
from .chunk_reads import identity
from .format import MAX_SOURCES, SCHEMA_VERSION, Provenance
from .opening import file_size, open_h5
from .validate import attr, index_column, parse_classes, schema_of, vlen_bytes
from .view import Tombstone, View, merge, shard_index

SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.h5")  # a plain file name: no '/', no leading '.'
MAX_SHARDS = 1 << 20


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
    size = file_size(f)  # of the file open, not of whatever the name leads to now
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
