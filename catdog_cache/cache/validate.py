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
from .format import SCHEMA_VERSION, Index, Provenance

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_VIEWS, MAX_DIM = 16, 1 << 20  # sanity bounds on a cache's declared shape


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
    Otherwise a crafted cache could make extract copy any readable file (or a bomb) into the next cache."""
    link = f.get(name, getlink=True)
    if link is None:
        raise CacheError(f"{path} is damaged (no {name!r}): delete it and extract again")
    if not isinstance(link, h5py.HardLink):
        raise CacheError(f"{path}: {name!r} is a link to another object or file; refusing a crafted cache")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise CacheError(f"{path} is damaged ({name!r} is not a dataset): delete it and extract again")
    if ds.external or ds.is_virtual or ds.id.get_create_plist().get_nfilters():
        raise CacheError(f"{path}: {name!r} uses external, virtual or filtered storage; refusing a crafted cache")
    return ds


def _check_schema(f: h5py.File, path: Path) -> None:
    version = f.attrs.get("schema_version")
    if version is None or "features" not in f:
        raise CacheError(f"{path} is an HDF5 file but not a catdog-cache cache")
    if not isinstance(version, int | np.integer):
        raise CacheError(f"{path} has a schema_version of type {type(version).__name__}; not a catdog-cache cache")
    if int(version) != SCHEMA_VERSION:
        raise CacheError(f"{path} uses cache schema {int(version)}; this catdog-cache reads schema {SCHEMA_VERSION}: "
                         "extract again into a new cache")


def _rows(f: h5py.Group, name: str, path: Path, n: int | None, kinds: str) -> h5py.Dataset:
    """A 1-D per-row dataset of the expected kind whose length matches the others and fits in the file."""
    ds = _dataset(f, name, path)
    if ds.ndim != 1 or (ds.dtype.kind not in kinds and h5py.check_vlen_dtype(ds.dtype) is None):
        raise CacheError(f"{path} is damaged ({name!r} has shape {ds.shape}, dtype {ds.dtype}): extract again")
    if n is not None and ds.shape[0] != n:
        raise CacheError(f"{path} is damaged ({name!r} has {ds.shape[0]} rows, features {n}): extract again")
    return ds


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
    try:
        prov = Provenance.from_json(f.attrs["provenance"], str(path))
        sources = json.loads(f.attrs["sources"])
        if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
            raise ValueError("sources is not a list of folders")
        incomplete = json.loads(f.attrs.get("incomplete", "[]"))
        if not isinstance(incomplete, list) or not all(isinstance(x, str) and x in sources for x in incomplete):
            raise ValueError("incomplete is not a list of its source folders")
        if "failures" not in f or not isinstance(f.get("failures", getlink=True), h5py.HardLink):
            raise ValueError("no failures group")
        fail = f["failures"]
        fn = _rows(fail, "paths", path, None, "O").shape[0]
        if fn > size:
            raise ValueError(f"{fn} failures declared")
        source = _rows(f, "source", path, n, "ui")[:].astype(np.int64)
        labels = _rows(f, "labels", path, n, "i")[:].astype(np.int8)
        index = Index(
            provenance=prov,
            sources=sources,
            source=source,
            paths=[bytes(p) for p in _rows(f, "paths", path, n, "O")[:]],
            labels=labels,
            sha256=[s.decode() for s in _rows(f, "sha256", path, n, "S")[:]],
            failed=list(zip(_rows(fail, "source", path, fn, "ui")[:].astype(np.int64).tolist(),
                            [bytes(p) for p in _rows(fail, "paths", path, fn, "O")[:]],
                            [s.decode() for s in _rows(fail, "sha256", path, fn, "S")[:]],
                            [r.decode() if isinstance(r, bytes) else str(r)
                             for r in _rows(fail, "reasons", path, fn, "SO")[:]], strict=True)),
            shape=tuple(feats.shape),
            dtype=str(feats.dtype),
            weights_path=str(f.attrs.get("weights_path", "")),
            incomplete=incomplete,
        )
    except CacheError:
        raise
    except (KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is damaged ({printable(str(e))}): delete it and extract again") from None
    if len(labels) and not np.isin(labels, (-1, 0, 1)).all():
        raise CacheError(f"{path} holds labels outside -1 (unlabeled), 0 (cat), 1 (dog): refusing it")
    used = np.concatenate([source, np.array([s for s, *_ in index.failed], np.int64)])
    if len(used) and (used.min() < 0 or used.max() >= len(sources)):
        raise CacheError(f"{path} has rows pointing at source folders it does not list: refusing it")
    return index
