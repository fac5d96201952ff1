"""The HDF5 feature cache: schema, provenance, crash-safe parts, assembly, reads. The only module that imports h5py.

Layout (schema 1), one file, rows sorted by (source, relative path):
  attrs     schema_version, provenance (JSON), class_map (JSON), sources (JSON list of folders), versions (JSON)
  features  [N, V, 4096] float32|float16, chunks of 64 rows, uncompressed
  paths     [N] variable-length bytes: the relative path exactly as the file system spells it
  source    [N] uint16 index into attrs["sources"]
  labels    [N] int8: 0 cat, 1 dog, -1 unlabeled
  sha256    [N] 64-char hex of the file's bytes
  failures/{paths, source, sha256, reasons}: files that could not be decoded, with the reason

Crash safety: extraction never writes into the cache. It writes small part files (same layout) into
`<cache>.parts/`, each to a temp name and renamed into place when complete, so a kill -9 loses at most the part in
progress. Assembly merges the cache and its parts into `<cache>.tmp` and renames it over the cache: every file under
a final name is always complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheBusy, CacheError, ProvenanceMismatch

SCHEMA_VERSION = 1
CHUNK_ROWS = 64  # 64 x 4096 x 4 B = 1 MiB per chunk: large sequential reads, cheap shuffled-chunk streaming
CLASS_MAP = {"cat": 0, "dog": 1}
_BYTES = h5py.vlen_dtype(bytes)
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Provenance:
    """Everything that decides what a feature row means. Equal provenance = interchangeable rows."""

    arch: str
    layer: str
    weights: str
    transform: str
    views: str  # comma-separated, e.g. "center" or "center,flip"
    dtype: str  # storage dtype of features
    precision: str  # compute precision of the backbone: fp32 | bf16 | fp16

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        return cls(**json.loads(text))

    def differences(self, other: Provenance, mine: str, theirs: str) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: {mine} has {a[k]}, {theirs} has {b[k]}" for k in a if a[k] != b[k]]


def require_same(have: Provenance, want: Provenance, have_name: str, want_name: str) -> None:
    diffs = have.differences(want, have_name, want_name)
    if diffs:
        raise ProvenanceMismatch(f"{have_name} and {want_name} disagree on how features are made: " + "; ".join(diffs))


@dataclass
class Rows:
    """Rows held in memory before they are written as one part."""

    features: list[np.ndarray] = field(default_factory=list)  # each [V, D]
    paths: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    failed_paths: list[bytes] = field(default_factory=list)
    failed_sha256: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) + len(self.failed_paths)


@dataclass
class Index:
    """A cache without its features: what is there, and what failed."""

    provenance: Provenance
    sources: list[str]
    source: np.ndarray  # [N] int
    paths: list[bytes]
    labels: np.ndarray  # [N] int8
    sha256: list[str]
    failed: list[tuple[int, bytes, str, str]]  # (source, path, sha256, reason)
    shape: tuple[int, ...]
    dtype: str

    def keys(self) -> list[tuple[str, bytes]]:
        return [(self.sources[s], p) for s, p in zip(self.source.tolist(), self.paths, strict=True)]


def encode_path(rel: str) -> bytes:
    return os.fsencode(rel)  # surrogate-escaped bytes come back exactly


# ---------------------------------------------------------------- opening and reading

@contextlib.contextmanager
def open_h5(path: Path, mode: str = "r") -> Iterator[h5py.File]:
    try:
        f = h5py.File(path, mode)
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}: run `catdog-cache extract DATA_DIR` first") from None
    except OSError as e:
        if "lock" in str(e).lower():
            raise CacheError(
                f"cannot lock {path} ({e}); on file systems without locking set HDF5_USE_FILE_LOCKING=FALSE"
            ) from None
        raise CacheError(f"{path} is not a readable HDF5 cache (truncated or damaged?): delete it and extract again") \
            from None
    try:
        yield f
    finally:
        f.close()


def _check_schema(f: h5py.File, path: Path) -> None:
    version = f.attrs.get("schema_version")
    if version is None or "features" not in f:
        raise CacheError(f"{path} is an HDF5 file but not a catdog-cache cache")
    if int(version) != SCHEMA_VERSION:
        raise CacheError(f"{path} uses cache schema {int(version)}; this catdog-cache reads schema {SCHEMA_VERSION}: "
                         "extract again into a new cache")


def read_index(path: str | os.PathLike[str]) -> Index:
    path = Path(path)
    with open_h5(path) as f:
        _check_schema(f, path)
        try:
            fail = f["failures"]
            return Index(
                provenance=Provenance.from_json(f.attrs["provenance"]),
                sources=json.loads(f.attrs["sources"]),
                source=f["source"][:].astype(np.int64),
                paths=[bytes(p) for p in f["paths"][:]],
                labels=f["labels"][:],
                sha256=[s.decode() for s in f["sha256"][:]],
                failed=list(zip(fail["source"][:].tolist(), [bytes(p) for p in fail["paths"][:]],
                                [s.decode() for s in fail["sha256"][:]],
                                [r.decode() if isinstance(r, bytes) else r for r in fail["reasons"][:]], strict=True)),
                shape=tuple(f["features"].shape),
                dtype=str(f["features"].dtype),
            )
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise CacheError(f"{path} is damaged ({e}): delete it and extract again") from None


def read_features(path: str | os.PathLike[str], view: int | None = 0) -> np.ndarray:
    """All features as float32: [N, D] for one view, [N, V, D] for view=None."""
    path = Path(path)
    with open_h5(path) as f:
        _check_schema(f, path)
        ds = f["features"]
        out = np.empty(ds.shape if view is None else (ds.shape[0], ds.shape[2]), dtype=np.float32)
        if out.shape[0] == 0:
            return out
        if view is None:
            out[...] = ds[...]
        elif ds.dtype == np.float32 and ds.shape[1] == 1:
            ds.read_direct(out.reshape(ds.shape))  # no temporary copy for the common case
        else:
            for s in range(0, ds.shape[0], 4096):
                out[s : s + 4096] = ds[s : s + 4096, view, :]
        return out


class BlockReader:
    """Features in blocks of whole HDF5 chunks, one block in memory at a time: for caches larger than memory."""

    def __init__(self, path: str | os.PathLike[str], block_rows: int, view: int = 0) -> None:
        path = Path(path)
        with open_h5(path) as f:
            _check_schema(f, path)
        self._file = h5py.File(path, "r")
        self._ds = self._file["features"]
        self.rows = self._ds.shape[0]
        self.block_rows = max(CHUNK_ROWS, block_rows // CHUNK_ROWS * CHUNK_ROWS)  # whole chunks only
        self.blocks = -(-self.rows // self.block_rows)
        self.view = view
        self._current: tuple[int, np.ndarray] | None = None

    def block(self, b: int) -> np.ndarray:
        """[rows in block, D] float32; the previous block is released."""
        if self._current is None or self._current[0] != b:
            self._current = None  # free before reading the next one
            lo = b * self.block_rows
            self._current = (b, self._ds[lo : lo + self.block_rows, self.view, :].astype(np.float32, copy=False))
        return self._current[1]

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- writing

def _write(f: h5py.File, prov: Provenance, sources: list[str], features: np.ndarray | tuple[int, ...],
           paths: list[bytes], source: np.ndarray, labels: np.ndarray, sha256: list[str],
           failed: list[tuple[int, bytes, str, str]], versions: dict[str, str]) -> h5py.Dataset:
    f.attrs["schema_version"] = SCHEMA_VERSION
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
    g = f.create_group("failures")
    g.create_dataset("source", data=np.array([x[0] for x in failed], dtype=np.uint16))
    g.create_dataset("paths", data=np.array([x[1] for x in failed], dtype=object), dtype=_BYTES)
    g.create_dataset("sha256", data=np.array([x[2] for x in failed], dtype="S64"))
    g.create_dataset("reasons", data=np.array([x[3] for x in failed], dtype=object), dtype=_STR)
    return ds


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def parts_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".parts")


def write_part(cache: Path, name: str, prov: Provenance, source: str, rows: Rows, versions: dict[str, str],
               feature_shape: tuple[int, int]) -> Path:
    """Write rows as one complete part file (temp name, then rename)."""
    folder = parts_dir(cache)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{name}.h5"
    tmp = folder / f"{name}.h5.tmp"
    feats = np.stack(rows.features) if rows.features else np.zeros((0, *feature_shape), np.float32)
    n = len(rows.paths)
    with h5py.File(tmp, "w") as f:
        _write(f, prov, [source], feats, rows.paths, np.zeros(n, np.uint16), np.array(rows.labels, np.int8),
               rows.sha256, [(0, p, s, r) for p, s, r in
                             zip(rows.failed_paths, rows.failed_sha256, rows.failed_reasons, strict=True)], versions)
    _replace_atomically(tmp, final)
    return final


def list_parts(cache: Path) -> list[Path]:
    folder = parts_dir(cache)
    if not folder.is_dir():
        return []
    for stale in folder.glob("*.tmp"):  # an unfinished part from a killed run: its rows are redone
        stale.unlink(missing_ok=True)
    return sorted(folder.glob("*.h5"))


def assemble(cache: Path, prov: Provenance, versions: dict[str, str], drop: set[tuple[str, bytes]] = frozenset(),
             block: int = 1024) -> Index:
    """Merge the cache and its parts into one new file, renamed over the cache; then delete the parts.

    Later parts win over earlier ones and over the cache (a changed file's new row replaces the old one);
    keys in `drop` are removed. Memory stays bounded: rows are copied `block` at a time."""
    parts = list_parts(cache)
    inputs = ([cache] if cache.exists() else []) + parts
    where: dict[tuple[str, bytes], tuple[int, int, int, str]] = {}  # key -> (input, row, label, sha)
    failed: dict[tuple[str, bytes], tuple[str, str]] = {}
    feature_shape: tuple[int, ...] | None = None
    sources: list[str] = []
    for i, path in enumerate(inputs):
        idx = read_index(path)
        require_same(idx.provenance, prov, str(path), "this run")
        feature_shape = idx.shape[1:]
        for s in idx.sources:
            if s not in sources:
                sources.append(s)
        for row, (key, lab, sha) in enumerate(zip(idx.keys(), idx.labels.tolist(), idx.sha256, strict=True)):
            where[key] = (i, row, lab, sha)
            failed.pop(key, None)
        for s, p, sha, reason in idx.failed:
            key = (idx.sources[s], p)
            failed[key] = (sha, reason)
            where.pop(key, None)
    for key in drop:
        where.pop(key, None)
        failed.pop(key, None)
    order = sorted(where, key=lambda k: (sources.index(k[0]), k[1]))
    src_id = {s: j for j, s in enumerate(sources)}
    n = len(order)
    shape = (n, *(feature_shape or (len(prov.views.split(",")), 4096)))
    tmp = cache.with_name(cache.name + ".tmp")
    handles: dict[int, h5py.File] = {}
    try:
        with h5py.File(tmp, "w") as out:
            ds = _write(out, prov, sources, shape, [k[1] for k in order],
                        np.array([src_id[k[0]] for k in order], np.uint16),
                        np.array([where[k][2] for k in order], np.int8), [where[k][3] for k in order],
                        [(src_id[k[0]], k[1], v[0], v[1]) for k, v in sorted(failed.items())], versions)
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
    _replace_atomically(tmp, cache)
    for p in parts:
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parts_dir(cache).rmdir()
    return read_index(cache)


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One writer per cache: a second `extract` refuses at once. The kernel drops the lock when a process dies."""
    import fcntl

    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = cache.with_name(cache.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise CacheBusy(f"{cache} is in use by another extract (lock {lock}); wait for it to finish") from None
            raise CacheError(f"cannot lock {lock} ({e.strerror}); on file systems without locking set "
                             "HDF5_USE_FILE_LOCKING=FALSE and run one extract at a time") from None
        yield
    finally:
        os.close(fd)


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

