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
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheBusy, CacheError, ProvenanceMismatch
from .files import fsync_dir, printable, require_space, stale_temps, temp_beside, write_atomic

SCHEMA_VERSION = 1
CHUNK_ROWS = 64  # 64 rows: 1 MiB at 4096-d float32 (320 KiB at 1280-d): large sequential reads, cheap streaming
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
    def from_json(cls, text: str | bytes, where: str = "") -> Provenance:
        """Parse and check a recorded provenance: every field present and a string (it comes from a file)."""
        try:
            data = json.loads(text)
            fields = [f for f in cls.__dataclass_fields__]
            if not isinstance(data, dict) or set(data) != set(fields) or \
                    not all(isinstance(data[k], str) for k in fields):
                raise ValueError("unexpected fields")
            transform = json.loads(data["transform"])  # later parsed as a preset: must be one
            if not isinstance(transform, dict) or not {"resize", "crop", "mean", "std", "interpolation"} <= set(
                    transform) or not data["views"]:
                raise ValueError("transform or views invalid")
            if data["layer"] == "classifier.5":  # what fc7 was called before backbones had layer names
                data["layer"] = "fc7"
            return cls(**{k: data[k] for k in fields})
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise CacheError(f"{where or 'file'} has no valid provenance ({e}): it was not written by catdog-cache "
                             "or is damaged") from None

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
    weights_path: str = ""  # where the --weights FILE was when extracted (its sha256 is in the provenance)

    def keys(self) -> list[tuple[str, bytes]]:
        return [(self.sources[s], p) for s, p in zip(self.source.tolist(), self.paths, strict=True)]


def encode_path(rel: str) -> bytes:
    return os.fsencode(rel)  # surrogate-escaped bytes come back exactly


# ---------------------------------------------------------------- opening and reading

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


def read_index(path: str | os.PathLike[str]) -> Index:
    path = Path(path)
    with open_h5(path) as f:
        return _index(f, path)


@contextlib.contextmanager
def open_cache(path: str | os.PathLike[str]) -> Iterator[tuple[h5py.File, Index]]:
    """One handle for index and features: an append between two opens cannot misalign labels and features."""
    path = Path(path)
    with open_h5(path) as f:
        yield f, _index(f, path)


def read_features(path: str | os.PathLike[str] | h5py.File, view: int | None = 0) -> np.ndarray:
    """All features as float32: [N, D] for one view, [N, V, D] for view=None."""
    with contextlib.ExitStack() as stack:
        if isinstance(path, h5py.File):
            f = path
        else:
            f, _ = stack.enter_context(open_cache(path))
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
    """Features in blocks of whole HDF5 chunks, one block in memory at a time: for caches larger than memory.
    Reads through the caller's open handle (the one its index came from)."""

    def __init__(self, f: h5py.File, block_rows: int, view: int = 0) -> None:
        self._ds = f["features"]
        self.rows, self.dim = self._ds.shape[0], self._ds.shape[2]
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


# ---------------------------------------------------------------- writing

def _write(f: h5py.File, prov: Provenance, sources: list[str], features: np.ndarray | tuple[int, ...],
           paths: list[bytes], source: np.ndarray, labels: np.ndarray, sha256: list[str],
           failed: list[tuple[int, bytes, str, str]], versions: dict[str, str], weights_path: str = "") -> h5py.Dataset:
    f.attrs["schema_version"] = SCHEMA_VERSION
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
    g = f.create_group("failures")
    g.create_dataset("source", data=np.array([x[0] for x in failed], dtype=np.uint16))
    g.create_dataset("paths", data=np.array([x[1] for x in failed], dtype=object), dtype=_BYTES)
    g.create_dataset("sha256", data=np.array([x[2] for x in failed], dtype="S64"))
    g.create_dataset("reasons", data=np.array([x[3] for x in failed], dtype=object), dtype=_STR)
    return ds


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
               feature_shape: tuple[int, int], weights_path: str = "") -> Path:
    """Write rows as one complete part file. The HDF5 image is built in memory and written with plain file I/O, so
    a full disk is an OSError we can report (HDF5 itself may crash on ENOSPC) and the temp file is removed."""
    folder = _parts_folder(cache, create=True)
    assert folder is not None
    feats = np.stack(rows.features) if rows.features else np.zeros((0, *feature_shape), np.float32)
    n = len(rows.paths)
    with h5py.File(f"{name}.h5", "w", driver="core", backing_store=False) as f:
        _write(f, prov, [source], feats, rows.paths, np.zeros(n, np.uint16), np.array(rows.labels, np.int8),
               rows.sha256, [(0, p, s, r) for p, s, r in
                             zip(rows.failed_paths, rows.failed_sha256, rows.failed_reasons, strict=True)], versions,
               weights_path)
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
             block: int = 1024, dim: int = 4096, weights_path: str = "") -> Index:
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
        weights_path = weights_path or idx.weights_path
        if feature_shape is not None and idx.shape[1:] != feature_shape:
            raise CacheError(f"{path} has features of shape {idx.shape[1:]}, the others {feature_shape}: refusing it")
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
    if len(sources) > np.iinfo(np.uint16).max:
        raise CacheError(f"{cache} would hold {len(sources)} source folders; the schema allows 65,535")
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
                            weights_path)
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


_HELD: set[Path] = set()  # caches locked by this process (POSIX locks do not refuse their own process)
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One writer per cache: a second `extract` refuses at once.

    A POSIX record lock (fcntl): it belongs to this process only, so forked loader workers do not inherit it and
    it dies with the process (a flock would live on in workers that outlive a kill -9). The lock file is opened
    without following links and keyed by the resolved cache path (one cache, one lock, however it is spelled)."""
    import fcntl

    cache = cache.resolve()
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = cache.with_name(cache.name + ".lock")
    with _HELD_LOCK:
        if cache in _HELD:
            raise CacheBusy(f"{cache} is in use by another extract in this process")
        _HELD.add(cache)
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CacheError(f"{lock} is a symbolic link; refusing to follow it (remove it)") from None
            raise
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise CacheBusy(f"{cache} is in use by another extract (lock {lock}); wait for it to finish") \
                        from None
                raise CacheError(f"cannot lock {lock} ({e.strerror}); this file system has no locking: set "
                                 "HDF5_USE_FILE_LOCKING=FALSE and run one extract at a time") from None
            try:
                moved = os.fstat(fd).st_ino != os.lstat(lock).st_ino
            except FileNotFoundError:
                moved = True
            if moved:  # its holder removed it between our open and our lock
                raise CacheBusy(f"{cache} was in use by another extract a moment ago; run again")
            for stale in stale_temps(cache):  # a killed assembly's temp file holds space; we hold the lock
                stale.unlink(missing_ok=True)
            try:
                yield
            finally:  # removed while still held (so no lock file outlives its run); the inode check covers a racer
                with contextlib.suppress(OSError):
                    os.unlink(lock)
        finally:
            os.close(fd)
    finally:
        with _HELD_LOCK:
            _HELD.discard(cache)


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

