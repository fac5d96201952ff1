"""Opening a cache and validating everything in it: every file read is treated as hostile."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheBusy, CacheError
from ..files import printable
from .format import CHUNK_ROWS, INDEX_SCHEMA, SCHEMA_VERSION, Index, Provenance, Refresh

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_VIEWS, MAX_DIM = 16, 1 << 20  # sanity bounds on a cache's declared shape
MAX_CLASSES, MAX_CLASS_NAME = 127, 255  # int8 labels; a folder name (as discover's bounds)


def parse_classes(text: object) -> list[str]:
    """class_map {name: index}: at most 127 classes (int8 labels), names non-empty strings of at most 255
    characters, indices exactly 0..K-1 (ints, not bools). Returns the names in index order."""
    data = json.loads(text)  # a str or bytes scalar (checked by _attr); anything else raises TypeError
    if not isinstance(data, dict) or len(data) > MAX_CLASSES:
        raise ValueError(f"class_map is not a mapping of at most {MAX_CLASSES} classes")
    if not all(isinstance(k, str) and 0 < len(k) <= MAX_CLASS_NAME for k in data):
        raise ValueError("class_map has an empty, overlong or non-text class name")
    if not all(type(v) is int for v in data.values()) or sorted(data.values()) != list(range(len(data))):
        raise ValueError("class_map indices are not 0..K-1")
    return sorted(data, key=data.__getitem__)


@contextlib.contextmanager
def open_h5(path: Path, mode: str = "r") -> Iterator[h5py.File]:
    """Open a cache, turning each way it can fail into one line that says what to do."""
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a cache file: give --cache a file name like {path}/features.h5")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}: run `catdog-cache extract DATA_DIR` first") from None
    except OSError as e:
        raise CacheError(f"cannot read {path}: {e.strerror}") from None
    if head[:4] == b"PK\x03\x04":  # a head or an export is a zip archive: good files, never "delete it"
        raise CacheError(f"{path} is a zip archive (a head written by fit, or an export), not a feature cache: "
                         "give a head as --head, and --cache the .h5 file it was trained on")
    if head != HDF5_SIGNATURE:
        raise CacheError(f"{path} is not a readable HDF5 cache (not HDF5, or truncated): delete it and extract again")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        text = str(e).lower()
        if "errno = 11" in text or "resource temporarily unavailable" in text:
            raise CacheBusy(f"{path} is open for writing by another process: wait for it to finish") from None
        if "errno = 38" in text or "function not implemented" in text or "errno = 37" in text:
            raise CacheError(f"cannot lock {path}: this file system has no file locking; set "
                             "HDF5_USE_FILE_LOCKING=FALSE and run one catdog-cache at a time on it") from None
        raise CacheError(f"{path} is not a readable HDF5 cache (truncated or damaged): delete it and extract again") \
            from None
    try:
        yield f
    finally:
        f.close()


def _dataset(f: h5py.Group, name: str, path: Path) -> h5py.Dataset:
    """A dataset stored in this file: no links elsewhere, no external raw storage, no virtual mapping, no filters.
    Otherwise a crafted cache could make extract copy any readable file (or a bomb) into the next cache.
    One link lookup and one creation property list per dataset: opening a cache of thousands of shards does this
    for every column of every shard."""
    bname = name.encode()
    if not f.id.links.exists(bname):
        raise CacheError(f"{path} is damaged (no {name!r}): delete it and extract again")
    if f.id.links.get_info(bname).type != h5py.h5l.TYPE_HARD:
        raise CacheError(f"{path}: {name!r} is a link to another object or file; refusing a crafted cache")
    oid = h5py.h5o.open(f.id, bname)
    if not isinstance(oid, h5py.h5d.DatasetID):
        raise CacheError(f"{path} is damaged ({name!r} is not a dataset): delete it and extract again")
    dcpl = oid.get_create_plist()
    if dcpl.get_external_count() or dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_nfilters():
        raise CacheError(f"{path}: {name!r} uses external, virtual or filtered storage; refusing a crafted cache")
    return h5py.Dataset(oid)


def schema_of(f: h5py.File, path: Path) -> int:
    """1: a single-file cache (or one shard); 2: a sharded cache's index. Anything else is refused."""
    try:
        version = _attr(f, "schema_version")
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


# Each per-row column has exactly the type parts._write gives it (a crafted `S2147483647` sha256 column would be
# allocated at 2 GiB per row; a vlen int one breaks every reader): a fixed dtype, or a variable-length kind.
COLUMNS: dict[str, np.dtype | type] = {"source": np.dtype("u2"), "labels": np.dtype("i1"), "sha256": np.dtype("S64"),
                                       "paths": bytes, "reasons": str,
                                       # a sharded cache's index (shards.py): shard names, sizes, deletion records
                                       "names": bytes, "rows": np.dtype("u8"), "bytes": np.dtype("u8"),
                                       "before": np.dtype("u4")}
MAX_CHUNK_BYTES = 64 << 20  # a features chunk larger than this is not one our writer makes for any sane width


def _rows(f: h5py.Group, name: str, path: Path, n: int | None) -> h5py.Dataset:
    """A 1-D per-row column of its exact type whose length matches the others, stored as our writer stores it:
    contiguous (a chunked column could hold one chunk per row, each a B-tree lookup)."""
    ds = _dataset(f, name, path)
    want = COLUMNS[name]
    vlen = h5py.check_vlen_dtype(ds.dtype)
    if ds.ndim != 1 or (vlen is not want if isinstance(want, type) else vlen is not None or ds.dtype != want):
        raise CacheError(f"{path} is damaged ({name!r} has shape {ds.shape}, dtype {ds.dtype}"
                         f"{f' of {vlen}' if vlen is not None else ''}; expected {getattr(want, '__name__', want)})"
                         ": extract again")
    if n is not None and ds.shape[0] != n:
        raise CacheError(f"{path} is damaged ({name!r} has {ds.shape[0]} rows, features {n}): extract again")
    if ds.chunks is not None:
        raise CacheError(f"{path}: {name!r} is chunked (chunks {ds.chunks}); catdog-cache never writes it so: "
                         "refusing a crafted cache")
    return ds


def _stats(f: h5py.Group, path: Path, n: int) -> np.ndarray | None:
    """A group's optional `stat` column: [n, 4] int64, contiguous, as parts._write stores it; None when absent (a
    cache written before stats: its files are hashed)."""
    if "stat" not in f:
        return None
    ds = _dataset(f, "stat", path)
    if n * 32 > path.stat().st_size:  # stored contiguous and unfiltered: it must be in the file
        raise CacheError(f"{path} declares {n} stat rows that its {path.stat().st_size}-byte file cannot hold: "
                         "refusing it")
    if ds.shape != (n, 4) or ds.dtype != np.dtype(np.int64) or ds.chunks is not None:
        raise CacheError(f"{path} is damaged ({f.name.rstrip('/')}/stat has shape {ds.shape}, dtype {ds.dtype}"
                         f"{', chunked' if ds.chunks is not None else ''}; expected [{n}, 4] int64, contiguous): "
                         "extract again")
    return ds[...]


def _refresh(f: h5py.File, path: Path, size: int) -> Refresh:
    """The optional refresh group of a part (see format.Refresh), checked like the failures."""
    if "refresh" not in f:
        return Refresh.empty()
    if not isinstance(f.get("refresh", getlink=True), h5py.HardLink) or not isinstance(f["refresh"], h5py.Group):
        raise CacheError(f"{path}: 'refresh' is a link or not a group; refusing a crafted cache")
    g = f["refresh"]
    k = _rows(g, "paths", path, None).shape[0]
    if k * 40 > size:  # each record stores at least its stat and heap id
        raise CacheError(f"{path} declares {k} refresh records that a {size}-byte file cannot hold: refusing it")
    cols = {name: _rows(g, name, path, k) for name in ("source", "paths", "sha256")}
    _vlen_bytes(cols["paths"], path, size)
    stat = _stats(g, path, k)
    if stat is None:
        raise CacheError(f"{path} is damaged (refresh records without their stat): extract again")
    return Refresh(cols["source"][:].astype(np.int64), [bytes(p) for p in cols["paths"][:]],
                   [s.decode() for s in cols["sha256"][:]], stat)


def _vlen_bytes(ds: h5py.Dataset, path: Path, size: int) -> int:
    """What a variable-length column expands to, read from the lengths stored in its elements before reading them:
    every row of a crafted file could point at the same large heap object (a 1 MB file, a terabyte read). On disk
    each element is a 4-byte length and a global heap id (an address and a 4-byte index)."""
    n = ds.shape[0]
    if n == 0:
        return 0
    offset = ds.id.get_offset()
    fcpl = ds.file.id.get_create_plist()
    item = 4 + fcpl.get_sizes()[0] + 4
    if ds.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS or offset is None or fcpl.get_userblock() or \
            offset + n * item > size:
        raise CacheError(f"{path}: {ds.name!r} is not stored as catdog-cache stores it; refusing a crafted cache")
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(n * item)
    if len(raw) != n * item:
        raise CacheError(f"{path} is truncated ({ds.name!r}): delete it and extract again")
    total = int(np.frombuffer(raw, np.dtype([("len", "<u4"), ("heap", f"V{item - 4}")]))["len"].sum(dtype=np.int64))
    if total > size:
        raise CacheError(f"{path}: {ds.name!r} declares {total} bytes that a {size}-byte file cannot hold: refusing it")
    return total


def _attr(f: h5py.File | h5py.AttributeManager, name: str) -> object:
    """One scalar attribute (an array of variable-length strings could point every element at one large object).
    `f` may be a file's AttributeManager, fetched once by a caller reading several."""
    attrs = f if isinstance(f, h5py.AttributeManager) else f.attrs
    if name not in attrs:
        raise KeyError(f"no attribute {name!r}")
    if attrs.get_id(name).shape != ():
        raise ValueError(f"attribute {name!r} is not a single value")
    return attrs[name]


def _check_chunks(feats: h5py.Dataset, path: Path) -> None:
    """Whole-row chunks of a sane size, as our writer makes them ((min(64, N), V, D); contiguous when empty).
    A crafted 1x1x1 chunking makes every read millions of B-tree lookups (fit: 30 s and 4.7 GB for a 63 MB file).
    Contiguous storage is one read, harmless at any size."""
    if feats.chunks is None:
        return
    n, v, d = feats.shape
    r = feats.chunks[0]
    row_bytes = v * d * feats.dtype.itemsize
    most = max(CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes)
    if tuple(feats.chunks[1:]) != (v, d) or not min(n, CHUNK_ROWS) <= r <= most:
        raise CacheError(f"{path}: features are stored in chunks of {feats.chunks}; catdog-cache writes whole rows, "
                         f"{CHUNK_ROWS} at a time ({(min(n, CHUNK_ROWS), v, d)}): refusing a crafted cache")


def _index(f: h5py.File, path: Path) -> Index:
    """Read and validate everything but the features. Every length, dtype, range and attribute comes from a file
    that may be crafted: check it before allocating or indexing anything with it."""
    _check_schema(f, path)
    feats = _dataset(f, "features", path)
    size = path.stat().st_size
    if feats.ndim != 3 or feats.dtype not in (np.float32, np.float16) or not 1 <= feats.shape[1] <= MAX_VIEWS \
            or not 1 <= feats.shape[2] <= MAX_DIM:
        raise CacheError(f"{path}: features have shape {feats.shape} and dtype {feats.dtype}; expected "
                         "[rows, views, dim] float32 or float16. Extract again")
    n = feats.shape[0]
    if n * feats.shape[1] * feats.shape[2] * feats.dtype.itemsize > size:  # no filters: data must be in the file
        raise CacheError(f"{path} declares {n} rows of features that a {size}-byte file cannot hold: refusing it")
    _check_chunks(feats, path)
    try:
        attrs = f.attrs  # one AttributeManager for every attribute read below
        prov = Provenance.from_json(_attr(attrs, "provenance"), str(path))
        sources = json.loads(_attr(attrs, "sources"))
        if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
            raise ValueError("sources is not a list of folders")
        incomplete = json.loads(_attr(attrs, "incomplete")) if "incomplete" in attrs else []
        if not isinstance(incomplete, list) or not all(isinstance(x, str) and x in sources for x in incomplete):
            raise ValueError("incomplete is not a list of its source folders")
        classes = parse_classes(_attr(attrs, "class_map"))
        if "failures" not in f or not isinstance(f.get("failures", getlink=True), h5py.HardLink):
            raise ValueError("no failures group")
        fail = f["failures"]
        fn = _rows(fail, "paths", path, None).shape[0]
        if fn > size:
            raise ValueError(f"{fn} failures declared")
        columns = {name: _rows(f, name, path, n) for name in ("source", "labels", "paths", "sha256")}
        failures = {name: _rows(fail, name, path, fn) for name in ("source", "paths", "sha256", "reasons")}
        for ds in (columns["paths"], failures["paths"], failures["reasons"]):
            _vlen_bytes(ds, path, size)  # before reading: their total is bounded by the file
        stat, failed_stat = _stats(f, path, n), _stats(fail, path, fn)
        refresh = _refresh(f, path, size)
        scan_ns = _attr(f, "scan_ns") if "scan_ns" in f.attrs else 0
        if not isinstance(scan_ns, int | np.integer) or isinstance(scan_ns, bool):
            raise ValueError(f"scan_ns is a {type(scan_ns).__name__}, not a time")
        source = columns["source"][:].astype(np.int64)
        labels = columns["labels"][:].astype(np.int8)
        index = Index(
            provenance=prov,
            sources=sources,
            source=source,
            paths=columns["paths"][:].tolist(),  # _rows checked the type: vlen bytes, read as bytes objects
            labels=labels,
            sha256=[s.decode() for s in columns["sha256"][:]],
            failed=list(zip(failures["source"][:].astype(np.int64).tolist(),
                            [bytes(p) for p in failures["paths"][:]],
                            [s.decode() for s in failures["sha256"][:]],
                            [r.decode() if isinstance(r, bytes) else str(r) for r in failures["reasons"][:]],
                            strict=True)),
            shape=tuple(feats.shape),
            dtype=str(feats.dtype),
            weights_path=str(_attr(attrs, "weights_path")) if "weights_path" in attrs else "",
            incomplete=incomplete,
            classes=classes,
            stat=stat,
            failed_stat=failed_stat,
            scan_ns=int(scan_ns),
            refresh=refresh,
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
