"""The HDF5 feature cache's schema and the records it holds (no h5py here: see validate, read, parts).

Layout (schema 1), one file, rows sorted by (source, relative path):
  attrs     schema_version, provenance (JSON), class_map (JSON), sources (JSON list of folders), versions (JSON),
            incomplete (optional JSON list: the sources whose last extract was interrupted before its end)
  features  [N, V, 4096] float32|float16, chunks of 64 rows, uncompressed
  paths     [N] variable-length bytes: the relative path exactly as the file system spells it
  source    [N] uint16 index into attrs["sources"]
  labels    [N] int8: an index into class_map ({"cat": 0, "dog": 1} for cat/dog; {} when no folder had labels),
            -1 unlabeled
  sha256    [N] 64-char hex of the file's bytes
  stat      [N, 4] int64 (optional): the file's (size, mtime_ns, inode, device) when the run saw it; -1 = unknown
  ctime     [N] int64 (optional): the file's st_ctime_ns when the run saw it (a column of its own, so a catdog-cache
            that predates it still reads the file); absent: unknown. In memory a stat row holds all five (STAT_FIELDS)
  failures/{paths, source, sha256, reasons}: files that could not be decoded, with the reason
  failures/stat [M, 4], failures/ctime [M] int64 (optional): as `stat`, `ctime`
  refresh/{source, paths, sha256, stat, ctime} (optional, parts only): known files a later run found unchanged by
            hashing, with their newer stat (assembly folds them into `stat`; see Refresh)
  attrs     scan_ns (optional int): time.time_ns() when the run that wrote the file started scanning its folder
Caches written before stats have no `stat` columns and no scan_ns, those before ctime no `ctime`: their files are
hashed once (see rerun.py).

Sharded (schema 2, see shard_state.py): `features.h5` is a small index and the rows live in immutable schema-1 files
`features.h5.shards/NAME.h5`; readers merge them (view.py) into exactly the rows the single file would hold.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import CacheError, ProvenanceMismatch

SCHEMA_VERSION = 1  # a file of rows: a single-file cache, or one shard of a sharded cache
INDEX_SCHEMA = 2  # a sharded cache's index (shard_state.py): the shard list and the cache-level attributes
CHUNK_ROWS = 64  # 64 rows: 1 MiB at 4096-d float32 (320 KiB at 1280-d): large sequential reads, cheap streaming
# the Kaggle classes, label i = CAT_DOG[i]; any labeled image folder records its own (discover.class_names)
CAT_DOG: tuple[str, ...] = ("cat", "dog")
CLASS_MAP = {c: i for i, c in enumerate(CAT_DOG)}  # CAT_DOG as a recorded class_map: {"cat": 0, "dog": 1}
MAX_CLASSES = 127  # labels are stored as int8 (-1 unlabeled): 127 classes fit
MAX_CLASS_NAME = 255  # a class name is a folder name: the common file systems allow 255; a longer one is crafted
# the columns of a stat row in memory; on disk the first four are `stat`, the last is `ctime` (see above)
STAT_FIELDS = ("size", "mtime_ns", "inode", "device", "ctime_ns")
STAT_WIDTH = len(STAT_FIELDS)
MAX_SOURCES = 65_535  # folders or tar shards per cache: `source` is uint16
UNKNOWN_STAT = (-1,) * STAT_WIDTH  # no stat recorded (older cache, racy file): never equals a real file's
# git's racy rule: a file whose mtime is not older than the scan that recorded it may have changed again within the
# same timestamp tick, so its stat proves nothing. The margin covers coarse timestamps: the kernel's clock for mtimes
# lags time.time_ns() by up to a tick, some file systems keep whole seconds (ext3, HFS+, many NFS setups) or two
# (FAT). Cost: files written in the last 2 s before a run are hashed once more by the next one.
RACY_NS = 2_000_000_000


def trusted(stat: np.ndarray, scan_ns: int | np.ndarray) -> np.ndarray:
    """[K, STAT_WIDTH] recorded stats -> the same with every racy or unknown row set to UNKNOWN_STAT: a stat is
    evidence only for a file last modified well before the scan that recorded it. `scan_ns`: one time, or [K] (a
    row's own). The rule reads mtime, as git's does: ctime is compared for equality only (rerun.py says what that
    leaves)."""
    out = np.array(stat, dtype=np.int64, copy=True).reshape(-1, STAT_WIDTH)
    out[(out[:, 0] < 0) | (out[:, 1] >= np.asarray(scan_ns, np.int64) - RACY_NS)] = UNKNOWN_STAT
    return out


def unknown_stats(n: int) -> np.ndarray:
    return np.full((n, STAT_WIDTH), -1, dtype=np.int64)


def weights_key(identity: str) -> str:
    """What a weights identity says about the features: a weights file is its sha256. The size recorded after it
    (`file:sha256=HEX,size=N`, backbone.Backbone.recorded_identity) only lets a wrong file be refused before it is
    hashed; a cache or head recorded without it names the same file."""
    return identity.partition(",size=")[0] if identity.startswith("file:") else identity


@dataclass(frozen=True)
class Provenance:
    """Everything that decides what a feature row means. Equal provenance = interchangeable rows (compared with the
    weights as weights_key reads them)."""

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

    def _key(self) -> tuple[str, ...]:
        return (self.arch, self.layer, weights_key(self.weights), self.transform, self.views, self.dtype,
                self.precision)

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, Provenance) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def differences(self, other: Provenance, mine: str, theirs: str) -> list[str]:
        a, b = asdict(self), asdict(other)
        diffs = []
        for k in a:
            if k == "transform" and a[k] != b[k]:
                diffs += transform_differences(a[k], b[k], mine, theirs)
            elif weights_key(a[k]) != weights_key(b[k]) if k == "weights" else a[k] != b[k]:
                diffs.append(f"{k}: {mine} has {a[k]}, {theirs} has {b[k]}")
        return diffs


def transform_differences(a: str, b: str, mine: str, theirs: str) -> list[str]:
    """The fields in which two recorded transforms differ (`transform decoder: the cache has pil, ...`), not the
    two whole JSON objects, in which the one differing field is hard to find. A missing decoder is pil."""
    try:
        x, y = json.loads(a), json.loads(b)
    except ValueError:
        x = y = None
    if not (isinstance(x, dict) and isinstance(y, dict)):
        return [f"transform: {mine} has {a}, {theirs} has {b}"]
    x, y = {"decoder": "pil", **x}, {"decoder": "pil", **y}

    def shown(v: object) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    diffs = [f"transform {k}: {mine} has {shown(x.get(k))}, {theirs} has {shown(y.get(k))}"
             for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    return diffs or [f"transform: {mine} has {a}, {theirs} has {b}"]  # equal fields, other spelling


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
    stat: list[tuple[int, int, int, int]] = field(default_factory=list)  # per row; empty: unknown
    failed_stat: list[tuple[int, int, int, int]] = field(default_factory=list)  # per failure; empty: unknown
    refresh: Refresh | None = None

    def __len__(self) -> int:
        return len(self.paths) + len(self.failed_paths)


@dataclass
class Refresh:
    """Known files that a run found unchanged by hashing (a copy that changed every mtime, a cache older than stats,
    a racy file), with the stat seen by that run. Recording it lets the next run skip them by stat without rewriting
    their feature rows: a few dozen bytes per file in a part, where a new row would cost the features again. It
    applies only to the row (or failure) holding the same sha256, so it can never vouch for other content; the
    newest stat per key wins, as rows do."""

    source: np.ndarray  # [K] int, index into the file's sources
    paths: list[bytes]
    sha256: list[str]
    stat: np.ndarray  # [K, STAT_WIDTH] int64

    @classmethod
    def empty(cls) -> Refresh:
        return cls(np.zeros(0, np.int64), [], [], unknown_stats(0))

    def __len__(self) -> int:
        return len(self.paths)


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
    incomplete: list[str] = field(default_factory=list)  # sources whose last extract was interrupted (Ctrl-C)
    classes: list[str] = field(default_factory=lambda: list(CAT_DOG))  # label i means classes[i]
    # [N, STAT_WIDTH] int64 as recorded (UNKNOWN_STAT rows where none was); None: all unknown
    stat: np.ndarray | None = None
    failed_stat: np.ndarray | None = None  # [M, STAT_WIDTH] int64, as `stat`
    scan_ns: int = 0  # when the run that wrote this file started its scan; 0: unknown (every stat is then racy)
    refresh: Refresh = field(default_factory=Refresh.empty)  # a shard's own records; a merged view has folded them
    # [N] / [M] int64: the scan time each row's stat was taken under. One file has one (scan_ns); a view merged from
    # shards has its rows' shards' (or, for a stat a later shard refreshed, that shard's): per row, as arrays
    stat_scan: np.ndarray | None = None
    failed_scan: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.stat = unknown_stats(len(self.paths)) if self.stat is None else self.stat
        self.failed_stat = unknown_stats(len(self.failed)) if self.failed_stat is None else self.failed_stat
        if self.stat_scan is None:
            self.stat_scan = np.full(len(self.paths), self.scan_ns, np.int64)
        if self.failed_scan is None:
            self.failed_scan = np.full(len(self.failed), self.scan_ns, np.int64)

    @property
    def labeled(self) -> bool:
        return bool((self.labels >= 0).any())

    def folded(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(stat, failed_stat, scan_ns) for writing these rows into ONE file (compact, assemble): each racy stat
        set to UNKNOWN_STAT under its own scan time, and the latest scan time as the file's. One attribute suffices,
        no per-row scan column: trust only grows with the scan time (mtime < scan - RACY_NS), so a stat trusted
        under its own scan is trusted under any later one, and an untrusted one is UNKNOWN for good; every row
        gets the same verdict from the file as it got from its shard."""
        assert self.stat is not None and self.failed_stat is not None
        scans = np.concatenate([self.stat_scan, self.failed_scan])
        return (trusted(self.stat, self.stat_scan), trusted(self.failed_stat, self.failed_scan),
                int(scans.max()) if len(scans) else self.scan_ns)

    def keys(self) -> list[tuple[str, bytes]]:
        return [(self.sources[s], p) for s, p in zip(self.source.tolist(), self.paths, strict=True)]

    def known(self, source: str) -> dict[bytes, str]:
        """Relative path -> sha256 of each file of folder `source` held as a row, or as a failure whose content was
        read: what a later extract of that folder need not read again while the hash matches. The one answer to
        "which files are known" for extract (what to do), predict (anything to do?) and scoring a training cache."""
        known = {p: sha for (s, p), sha in zip(self.keys(), self.sha256, strict=True) if s == source}
        known |= {p: sha for s, p, sha, _ in self.failed if self.sources[s] == source and sha}
        return known

    def _source_id(self, source: str) -> int | None:
        return self.sources.index(source) if source in self.sources else None


@dataclass
class Recorded:
    """What a cache and its parts record of one folder's files, one entry per row of `stat`: `paths` (relative,
    encoded), their `shas` (sha256) and `stat` [K, STAT_WIDTH] int64 the trusted stats (UNKNOWN_STAT where racy or not
    recorded). A path recorded twice (a later part's row) is the later entry. Columns, not a tuple per file: a rerun
    of a large folder whose paths are exactly `paths` compares them as lists and never builds `entries`."""

    paths: list[bytes]
    shas: list[str]
    stat: np.ndarray

    @functools.cached_property
    def entries(self) -> dict[bytes, tuple[str, int]]:
        """path -> (sha256, row of `stat`), the later entry of a path recorded twice; built on the first lookup."""
        return dict(zip(self.paths, zip(self.shas, range(len(self.paths)), strict=True), strict=True))

    def __contains__(self, path: bytes) -> bool:
        return path in self.entries

    def sha256(self, path: bytes) -> str:
        return self.entries[path][0]

    def subset(self, paths: list[bytes]) -> Recorded:
        """The entries of these paths (those recorded) alone, e.g. one input shard's for a Ray task."""
        mine = [p for p in paths if p in self.entries]
        return Recorded(mine, [self.entries[p][0] for p in mine], self.stats(mine).reshape(-1, STAT_WIDTH))

    def stats(self, paths: list[bytes]) -> np.ndarray:
        """[len(paths), STAT_WIDTH] the trusted stats of these recorded paths."""
        return self.stat[[self.entries[p][1] for p in paths]]


def recorded(indexes: list[Index], source: str) -> Recorded:
    """What a cache and its parts (oldest first) record of folder `source`'s files. Later files win, as in
    assembly; failures whose content was read count (as in Index.known); a refresh record replaces the stat of the
    entry holding its sha256 only: it can vouch for no other content."""
    paths: list[bytes] = []
    shas: list[str] = []
    blocks: list[np.ndarray] = []
    for idx in indexes:
        assert idx.stat is not None and idx.failed_stat is not None
        sid = idx._source_id(source)
        if sid is None:
            continue
        rows = np.flatnonzero(idx.source == sid)
        paths += idx.paths if len(rows) == len(idx.paths) else [idx.paths[r] for r in rows.tolist()]
        shas += idx.sha256 if len(rows) == len(idx.paths) else [idx.sha256[r] for r in rows.tolist()]
        blocks.append(trusted(idx.stat[rows], idx.stat_scan[rows]))
        fails = [k for k, (s, _, sha, _) in enumerate(idx.failed) if s == sid and sha]
        paths += [idx.failed[k][1] for k in fails]
        shas += [idx.failed[k][2] for k in fails]
        blocks.append(trusted(idx.failed_stat[fails], idx.failed_scan[fails]))
        mine = np.flatnonzero(idx.refresh.source == sid).tolist()
        if mine:  # what each path holds so far (the later entry wins): a refresh vouches for that content only
            now = dict(zip(paths, shas, strict=True))
            vouched = [k for k in mine if now.get(idx.refresh.paths[k]) == idx.refresh.sha256[k]]
            paths += [idx.refresh.paths[k] for k in vouched]
            shas += [idx.refresh.sha256[k] for k in vouched]
            blocks.append(trusted(idx.refresh.stat[vouched], idx.scan_ns))
    return Recorded(paths, shas, np.concatenate(blocks) if blocks else unknown_stats(0))


_FS = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def merge_classes(inputs: list[tuple[list[str], bool]], where: str) -> list[str]:
    """The classes of a cache assembled from inputs [(classes, holds labeled rows)]: those holding labels must name
    the same classes in the same order (extract maps a folder's labels onto the cache's classes before writing);
    the others' lists mean nothing. Labels index the list: merging two orders would silently relabel rows."""
    labeled = [c for c, has in inputs if has]
    for c in labeled[1:]:
        if c != labeled[0]:
            raise CacheError(f"{where}: the parts label with different classes ({', '.join(labeled[0])} vs "
                             f"{', '.join(c)}); refusing to merge them")
    if labeled:
        return labeled[0]
    named = [c for c, _ in inputs if c]
    return named[-1] if named else []


def encode_path(rel: str) -> bytes:
    return rel.encode(*_FS)  # os.fsencode without its checks (once per file per rerun): surrogate escapes round-trip


def encode_paths(rels: list[str]) -> list[bytes]:
    """[encode_path(r) for r in rels], about 10x faster: one encode of all the paths joined by NUL, which no file
    name holds (a path that does is encoded alone)."""
    out = "\0".join(rels).encode(*_FS).split(b"\0") if rels else []
    return out if len(out) == len(rels) else [encode_path(r) for r in rels]
