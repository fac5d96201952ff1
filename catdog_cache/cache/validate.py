"""Opening a cache and validating everything in it: every file read is treated as hostile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import printable
from .format import (
    CHUNK_ROWS,
    INDEX_SCHEMA,
    MAX_CLASS_NAME,
    MAX_CLASSES,
    SCHEMA_VERSION,
    STAT_WIDTH,
    Index,
    Provenance,
    Refresh,
)
from .opening import file_size
from .packed_index import PackedPaths, Unread, scan_view, unknown_stat_view

MAX_VIEWS, MAX_DIM = 16, 1 << 20  # sanity bounds on a cache's declared shape


def parse_classes(text: object) -> list[str]:
    """class_map {name: index}: at most 127 classes (int8 labels), names non-empty strings of at most 255
    characters, indices exactly 0..K-1 (ints, not bools). Returns the names in index order."""
    data = json.loads(text)  # a str or bytes scalar (checked by attr); anything else raises TypeError
    if not isinstance(data, dict) or len(data) > MAX_CLASSES:
        raise ValueError(f"class_map is not a mapping of at most {MAX_CLASSES} classes")
    if not all(isinstance(k, str) and 0 < len(k) <= MAX_CLASS_NAME for k in data):
        raise ValueError("class_map has an empty, overlong or non-text class name")
    if not all(type(v) is int for v in data.values()) or sorted(data.values()) != list(range(len(data))):
        raise ValueError("class_map indices are not 0..K-1")
    return sorted(data, key=data.__getitem__)


def _open_ds(g: h5py.h5g.GroupID, name: str, path: Path) -> tuple[h5py.h5d.DatasetID, h5py.h5p.PropDCID]:
    """A dataset stored in this file: no links elsewhere, no external raw storage, no virtual mapping, no filters.
    Otherwise a crafted cache could make extract copy any readable file (or a bomb) into the next cache.
    Low-level calls only (a link lookup, an open, one creation property list): opening a cache of thousands of
    shards does this for every column of every shard, and h5py's Dataset wrapper costs as much again."""
    bname = name.encode()
    if not g.links.exists(bname):
        raise CacheError(f"{path} is damaged (no {name!r}): delete it and extract again")
    if g.links.get_info(bname).type != h5py.h5l.TYPE_HARD:
        raise CacheError(f"{path}: {name!r} is a link to another object or file; refusing a crafted cache")
    oid = h5py.h5o.open(g, bname)
    if not isinstance(oid, h5py.h5d.DatasetID):
        raise CacheError(f"{path} is damaged ({name!r} is not a dataset): delete it and extract again")
    dcpl = oid.get_create_plist()
    if dcpl.get_external_count() or dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_nfilters():
        raise CacheError(f"{path}: {name!r} uses external, virtual or filtered storage; refusing a crafted cache")
    return oid, dcpl


def schema_of(f: h5py.File, path: Path) -> int:
    """1: a single-file cache (or one shard); 2: a sharded cache's index. Anything else is refused."""
    try:
        version = attr(f, "schema_version")
    except (KeyError, ValueError):
        version = None
    if version is None or "features" not in f:
        raise CacheError(f"{path} is an HDF5 file but not a catdog-cache cache")
    if not isinstance(version, int | np.integer):
        raise CacheError(f"{path} has a schema_version of type {type(version).__name__}; not a catdog-cache cache")
    if int(version) not in (SCHEMA_VERSION, INDEX_SCHEMA):
        raise CacheError(f"{path} uses cache schema {int(version)}; this catdog-cache reads schemas {SCHEMA_VERSION} "
                         f"and {INDEX_SCHEMA}: extract again into a new cache")
    return int(version)


def _check_schema(f: h5py.File, path: Path) -> None:
    """A file holding rows itself (schema 1: a single-file cache or a shard)."""
    if schema_of(f, path) != SCHEMA_VERSION:
        raise CacheError(f"{path} is a sharded cache's index, not a file of rows; refusing it here")


# Each per-row column has exactly the type rowfile.write_rows gives it (a crafted `S2147483647` sha256 column would be
# allocated at 2 GiB per row; a vlen int one breaks every reader): a fixed dtype, or a variable-length kind.
COLUMNS: dict[str, np.dtype | type] = {"source": np.dtype("u2"), "labels": np.dtype("i1"), "sha256": np.dtype("S64"),
                                       "paths": bytes, "reasons": str,
                                       # a sharded cache's index (shard_state.py): shard names, sizes, deletion records
                                       "names": bytes, "rows": np.dtype("u8"), "bytes": np.dtype("u8"),
                                       "before": np.dtype("u4")}
MAX_CHUNK_BYTES = 64 << 20  # a features chunk larger than this is not one our writer makes for any sane width


def _column(g: h5py.h5g.GroupID, name: str, path: Path, n: int | None) -> h5py.h5d.DatasetID:
    """A 1-D per-row column of its exact type whose length matches the others, stored as our writer stores it:
    contiguous (a chunked column could hold one chunk per row, each a B-tree lookup)."""
    oid, dcpl = _open_ds(g, name, path)
    want = COLUMNS[name]
    dtype, shape = oid.dtype, oid.shape
    vlen = h5py.check_vlen_dtype(dtype)
    if len(shape) != 1 or (vlen is not want if isinstance(want, type) else vlen is not None or dtype != want):
        raise CacheError(f"{path} is damaged ({name!r} has shape {shape}, dtype {dtype}"
                         f"{f' of {vlen}' if vlen is not None else ''}; expected {getattr(want, '__name__', want)})"
                         ": extract again")
    if n is not None and shape[0] != n:
        raise CacheError(f"{path} is damaged ({name!r} has {shape[0]} rows, features {n}): extract again")
    if dcpl.get_layout() == h5py.h5d.CHUNKED:
        raise CacheError(f"{path}: {name!r} is chunked (chunks {dcpl.get_chunk()}); catdog-cache never writes it "
                         "so: refusing a crafted cache")
    return oid


def index_column(f: h5py.Group, name: str, path: Path, n: int | None) -> h5py.Dataset:
    """A per-row column of a sharded cache's index file, as an h5py Dataset, checked as `_column` checks a file of
    rows' columns: its exact type, `n` rows (None: any), stored contiguous."""
    return h5py.Dataset(_column(f.id, name, path, n))


def _read(oid: h5py.h5d.DatasetID) -> np.ndarray:
    """A whole (validated) dataset into a fresh array: one low-level read, none of h5py's selection machinery."""
    out = np.empty(oid.shape, oid.dtype)
    if out.size:
        oid.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out


def _group(g: h5py.h5g.GroupID, name: str) -> h5py.h5g.GroupID | None:
    """A sub-group stored here (a hard link to a group), None when absent; a link or a non-group is refused."""
    bname = name.encode()
    if not g.links.exists(bname):
        return None
    if g.links.get_info(bname).type != h5py.h5l.TYPE_HARD:
        raise ValueError(f"{name!r} is a link")
    oid = h5py.h5o.open(g, bname)
    if not isinstance(oid, h5py.h5g.GroupID):
        raise ValueError(f"{name!r} is not a group")
    return oid


def _stats(g: h5py.h5g.GroupID, path: Path, n: int, size: int, where: str, read: bool = True) -> np.ndarray | None:
    """A group's optional `stat` [n, 4] and `ctime` [n] int64 columns, contiguous, as rowfile.write_rows stores them,
    as [n, STAT_WIDTH] (ctime -1 where a file predates the column: its files are hashed once); None when `stat` is
    absent (a cache written before stats: its files are hashed). `where`: the group's name for messages ('' for the
    root). read False: checked, not read (a lean open): all unknown, without memory."""
    if not g.links.exists(b"stat"):
        return None
    if n * 32 > size:  # stored contiguous and unfiltered: it must be in the file
        raise CacheError(f"{path} declares {n} stat rows that its {size}-byte file cannot hold: refusing it")
    oid = _stat_column(g, "stat", (n, 4), path, where)
    ctime = _stat_column(g, "ctime", (n,), path, where) if g.links.exists(b"ctime") else None
    if not read:
        return unknown_stat_view(n)
    out = np.full((n, STAT_WIDTH), -1, np.int64)
    if n:
        out[:, :4] = _read(oid)
        if ctime is not None:
            out[:, 4] = _read(ctime)
    return out


def _stat_column(g: h5py.h5g.GroupID, name: str, shape: tuple[int, ...], path: Path, where: str
                 ) -> h5py.h5d.DatasetID:
    oid, dcpl = _open_ds(g, name, path)
    chunked = dcpl.get_layout() == h5py.h5d.CHUNKED
    if oid.shape != shape or oid.dtype != np.dtype(np.int64) or chunked:
        raise CacheError(f"{path} is damaged ({where}/{name} has shape {oid.shape}, dtype {oid.dtype}"
                         f"{', chunked' if chunked else ''}; expected {list(shape)} int64, contiguous): extract again")
    return oid


def _refresh(f: h5py.File, path: Path, size: int) -> Refresh:
    """The optional refresh group of a part (see format.Refresh), checked like the failures."""
    try:
        g = _group(f.id, "refresh")
    except ValueError:
        raise CacheError(f"{path}: 'refresh' is a link or not a group; refusing a crafted cache") from None
    if g is None:
        return Refresh.empty()
    k = _column(g, "paths", path, None).shape[0]
    if k * 40 > size:  # each record stores at least its stat and heap id
        raise CacheError(f"{path} declares {k} refresh records that a {size}-byte file cannot hold: refusing it")
    cols = {name: _column(g, name, path, k) for name in ("source", "paths", "sha256")}
    _vlen_total(cols["paths"], "/refresh/paths", path, size)
    stat = _stats(g, path, k, size, "/refresh")
    if stat is None:
        raise CacheError(f"{path} is damaged (refresh records without their stat): extract again")
    return Refresh(_read(cols["source"]).astype(np.int64), _read(cols["paths"]).tolist(),
                   [s.decode() for s in _read(cols["sha256"])], stat)


def _vlen_total(oid: h5py.h5d.DatasetID, name: str, path: Path, size: int) -> int:
    """What a variable-length column expands to, read from the lengths stored in its elements before reading them:
    every row of a crafted file could point at the same large heap object (a 1 MB file, a terabyte read). On disk
    each element is a 4-byte length and a global heap id (an address and a 4-byte index). Read with pread from the
    descriptor HDF5 itself reads (never the name opened again: it could be another file by now)."""
    n = oid.shape[0]
    if n == 0:
        return 0
    offset = oid.get_offset()
    fcpl = h5py.h5i.get_file_id(oid).get_create_plist()
    item = 4 + fcpl.get_sizes()[0] + 4
    if oid.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS or offset is None or fcpl.get_userblock() or \
            offset + n * item > size:
        raise CacheError(f"{path}: {name!r} is not stored as catdog-cache stores it; refusing a crafted cache")
    raw = _pread(h5py.h5i.get_file_id(oid).get_vfd_handle(), n * item, offset)
    if len(raw) != n * item:
        raise CacheError(f"{path} is truncated ({name!r}): delete it and extract again")
    total = int(np.frombuffer(raw, np.dtype([("len", "<u4"), ("heap", f"V{item - 4}")]))["len"].sum(dtype=np.int64))
    if total > size:
        raise CacheError(f"{path}: {name!r} declares {total} bytes that a {size}-byte file cannot hold: refusing it")
    return total


def _pread(fd: int, n: int, offset: int) -> bytes:
    """n bytes at offset (fewer only at the end of the file)."""
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def vlen_bytes(ds: h5py.Dataset, path: Path, size: int) -> int:
    """The bytes a variable-length column of the index file expands to, bounded by the file's `size` before any
    element is read (see _vlen_total)."""
    return _vlen_total(ds.id, ds.name, path, size)


def attr(f: h5py.File | h5py.AttributeManager, name: str) -> object:
    """One scalar attribute (an array of variable-length strings could point every element at one large object).
    `f` may be a file's AttributeManager, fetched once by a caller reading several."""
    attrs = f if isinstance(f, h5py.AttributeManager) else f.attrs
    if name not in attrs:
        raise KeyError(f"no attribute {name!r}")
    if attrs.get_id(name).shape != ():
        raise ValueError(f"attribute {name!r} is not a single value")
    return attrs[name]


def _check_chunks(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...] | None, path: Path) -> None:
    """Whole-row chunks of a sane size, as our writer makes them ((min(64, N), V, D); contiguous when empty).
    A crafted 1x1x1 chunking makes every read millions of B-tree lookups (fit: 30 s and 4.7 GB for a 63 MB file).
    Contiguous storage is one read, harmless at any size."""
    if chunks is None:
        return
    n, v, d = shape
    r = chunks[0]
    row_bytes = v * d * dtype.itemsize
    most = max(CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes)
    if tuple(chunks[1:]) != (v, d) or not min(n, CHUNK_ROWS) <= r <= most:
        raise CacheError(f"{path}: features are stored in chunks of {chunks}; catdog-cache writes whole rows, "
                         f"{CHUNK_ROWS} at a time ({(min(n, CHUNK_ROWS), v, d)}): refusing a crafted cache")


_PROVENANCE: dict[str, Provenance] = {}  # recorded text -> parsed: thousands of shards record the same one


def _provenance(text: object, path: Path) -> Provenance:
    prov = _PROVENANCE.get(text) if isinstance(text, str) else None
    if prov is None:
        prov = Provenance.from_json(text, str(path))
        if isinstance(text, str) and len(_PROVENANCE) < 64:
            _PROVENANCE[text] = prov
    return prov


def file_index(f: h5py.File, path: Path, size: int | None = None, lean: bool = False) -> Index:
    """The Index of one file of rows (a single-file cache or one shard): everything but the features, read and
    validated. Every length, dtype, range and attribute comes from a file that may be crafted: check it before
    allocating or indexing anything with it. `size`: the open file's size (its descriptor's), when the
    caller has it.
    Low-level h5py throughout: a 10M-row cache has ~10,000 shards to open.
    lean: what fit needs (packed_index.py): the paths packed, the sha256 and stat columns checked but not read."""
    _check_schema(f, path)
    feats, dcpl = _open_ds(f.id, "features", path)
    size = file_size(f) if size is None else size
    shape, dtype = feats.shape, feats.dtype
    if len(shape) != 3 or dtype not in (np.float32, np.float16) or not 1 <= shape[1] <= MAX_VIEWS \
            or not 1 <= shape[2] <= MAX_DIM:
        raise CacheError(f"{path}: features have shape {shape} and dtype {dtype}; expected "
                         "[rows, views, dim] float32 or float16. Extract again")
    n = shape[0]
    if n * shape[1] * shape[2] * dtype.itemsize > size:  # no filters: data must be in the file
        raise CacheError(f"{path} declares {n} rows of features that a {size}-byte file cannot hold: refusing it")
    _check_chunks(shape, dtype, dcpl.get_chunk() if dcpl.get_layout() == h5py.h5d.CHUNKED else None, path)
    try:
        attrs = f.attrs  # one AttributeManager for every attribute read below
        prov = _provenance(attr(attrs, "provenance"), path)
        sources = json.loads(attr(attrs, "sources"))
        if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
            raise ValueError("sources is not a list of folders")
        incomplete = json.loads(attr(attrs, "incomplete")) if "incomplete" in attrs else []
        if not isinstance(incomplete, list) or not all(isinstance(x, str) and x in sources for x in incomplete):
            raise ValueError("incomplete is not a list of its source folders")
        classes = parse_classes(attr(attrs, "class_map"))
        fail = _group(f.id, "failures")
        if fail is None:
            raise ValueError("no failures group")
        fn = _column(fail, "paths", path, None).shape[0]
        if fn > size:
            raise ValueError(f"{fn} failures declared")
        columns = {name: _column(f.id, name, path, n) for name in ("source", "labels", "paths", "sha256")}
        failures = {name: _column(fail, name, path, fn) for name in ("source", "paths", "sha256", "reasons")}
        for name, oid in (("/paths", columns["paths"]), ("/failures/paths", failures["paths"]),
                          ("/failures/reasons", failures["reasons"])):  # before reading them: bounded by the file
            _vlen_total(oid, name, path, size)
        refresh = _refresh(f, path, size)
        stat, failed_stat = _stats(f.id, path, n, size, "", not lean), _stats(fail, path, fn, size, "/failures")
        if lean and stat is None:
            stat = unknown_stat_view(n)
        scan_ns = attr(attrs, "scan_ns") if "scan_ns" in attrs else 0
        if not isinstance(scan_ns, int | np.integer) or isinstance(scan_ns, bool):
            raise ValueError(f"scan_ns is a {type(scan_ns).__name__}, not a time")
        source = _read(columns["source"])  # [n] uint16 as stored; int64 for every caller but a lean one
        source = source if lean else source.astype(np.int64)
        labels = _read(columns["labels"])
        index = Index(
            provenance=prov,
            sources=sources,
            source=source,
            paths=PackedPaths.of(_read(columns["paths"]).tolist()) if lean else _read(columns["paths"]).tolist(),
            labels=labels,
            sha256=Unread("sha256", n) if lean else [s.decode() for s in _read(columns["sha256"])],
            failed=list(zip(_read(failures["source"]).astype(np.int64).tolist(),
                            _read(failures["paths"]).tolist(),
                            [s.decode() for s in _read(failures["sha256"])],
                            [r.decode() if isinstance(r, bytes) else str(r) for r in _read(failures["reasons"])],
                            strict=True)),
            shape=tuple(shape),
            dtype=str(dtype),
            weights_path=str(attr(attrs, "weights_path")) if "weights_path" in attrs else "",
            incomplete=incomplete,
            classes=classes,
            stat=stat,
            failed_stat=failed_stat,
            scan_ns=int(scan_ns),
            refresh=refresh,
            stat_scan=scan_view(n, int(scan_ns)) if lean else None,
        )
    except CacheError:
        raise
    except (KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is damaged ({printable(str(e))}): delete it and extract again") from None
    if len(labels) and (labels.min() < -1 or labels.max() >= len(classes)):
        raise CacheError(f"{path} holds labels outside -1 (unlabeled) and its {len(classes)} classes "
                         f"({printable(', '.join(classes)[:200]) or 'none'}): refusing it")
    used = np.concatenate([source, np.array([s for s, *_ in index.failed], np.int64), index.refresh.source])
    if len(used) and (used.min() < 0 or used.max() >= len(sources)):
        raise CacheError(f"{path} has rows pointing at source folders it does not list: refusing it")
    return index

