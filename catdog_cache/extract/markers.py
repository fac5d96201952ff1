"""The one resume-marker protocol, for every kind of unit (a slice of a folder's file list, a tar) and every engine.

A unit is done when `<cache>.done/<unit>.json` carries the unit's identity: a digest of what the unit holds as it is
now and of the features' provenance (folder_units.folder_units, tar_identity here), so a changed input or other
settings make the marker stale and the unit is read again. The marker is written last, after the unit's cache shards
are on disk (each temp + rename): a kill before it leaves the unit undone, never half done. Markers come from disk
and are read as hostile input: bounded, checked field by field, never through a link; anything odd means "not done",
and the unit is simply redone.

A marker also records the digest of the rows it vouches for (rows_digest: each row's and failure record's key,
content sha256 and label, sorted by key), and a unit is done only when the cache holds exactly those rows now: a
cache restored from a backup beside newer markers, or a run killed between a redone tar's marker and the index that
drops its stale keys, holds other rows, and the unit is redone (its rows replace those the cache holds: later shards
win, keys it no longer has are dropped). The digest is over content, not shard names, so a compact keeps it valid.
A tar marker written before markers carried a digest is verified once by the cheapest sound rule: the tar is read
and its members hashed (no decoding, no backbone) and compared with the cache's rows; a match upgrades the marker.

Caches made before tar markers joined this folder kept them in `<cache>.inputs/<digest>.json` with their own fields:
read_marker falls back to them (legacy_tar_marker), the one place that knows that layout."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..cache import Index, Provenance, encode_path
from ..cache.format import RACY_NS, weights_key
from ..errors import CacheError
from ..files import read_regular, write_atomic
from ..sources import tars
from ..sources.spec import Identity

MARKER_VERSION = 1
MARKER_MAX_BYTES = 64 * 1024
_FIELDS = {"identity": str, "part": str, "rows": int, "failures": int}  # every marker has these, so typed


@dataclass(frozen=True)
class Marker:
    """A unit's done marker: which unit, with which identity, holding how many rows and failure records."""

    unit: str  # the file's stem: files-<source digest>-<index>, or tar-<source digest>
    identity: str
    rows: int
    failures: int
    kind: str = "files"  # files | tar
    source: str = ""
    part: str = ""  # a folder unit's one cache shard, written by this attempt ("" when it needed none)
    run: str = ""
    digest: str = ""  # rows_digest of the rows it vouches for ("": written before markers had one)

    def to_json(self) -> bytes:
        return json.dumps({"version": MARKER_VERSION, **asdict(self)}).encode()


def markers_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".done")


def legacy_tar_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".inputs")


def markers_folder(cache: Path, create: bool = False) -> Path | None:
    """The markers folder, never through a symlink (a planted link would send markers, and deletions, elsewhere);
    None when it does not exist and `create` is not asked."""
    folder = markers_dir(cache)
    if folder.is_symlink():
        raise CacheError(f"{folder} is a symbolic link; refusing to write or delete markers through it (remove it)")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        return None
    return folder


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()


def tar_unit(source: str) -> str:
    return f"tar-{source_digest(source)[:40]}"


def tar_identity(source: str, ident: Identity, provenance: str) -> str:
    """A tar's identity as its marker records it: the tar as it is now (size + mtime, or ETag) and the features."""
    text = json.dumps([MARKER_VERSION, "tar", source, ident.size, ident.version, provenance])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def write_marker(cache: Path, marker: Marker) -> None:
    folder = markers_folder(cache, create=True)
    assert folder is not None
    write_atomic(folder / f"{marker.unit}.json", marker.to_json())


def _read_json(path: Path) -> dict | None:
    """A marker's JSON object: a plain regular file (never a link, FIFO or device), at most MARKER_MAX_BYTES."""
    try:
        data = None if path.is_symlink() else json.loads(read_regular(path, MARKER_MAX_BYTES))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_marker(cache: Path, unit: str) -> Marker | None:
    """The unit's marker, or None (absent, damaged, foreign, oversized). A tar's falls back to the legacy folder."""
    folder = markers_folder(cache)
    data = _read_json(folder / f"{unit}.json") if folder is not None else None
    if data is None:
        return legacy_tar_marker(cache, unit) if unit.startswith("tar-") else None
    if data.get("version") != MARKER_VERSION or not all(isinstance(data.get(k), t) for k, t in _FIELDS.items()):
        return None
    text = {k: data.get(k, "") for k in ("kind", "source", "run", "digest")}
    if not all(isinstance(v, str) for v in text.values()):
        return None
    part = data["part"]
    if "/" in part or "\0" in part or part.startswith("."):
        return None  # a part is a plain name inside the cache's shards folder
    return Marker(unit, data["identity"], data["rows"], data["failures"], text["kind"] or "files", text["source"],
                  part, text["run"], text["digest"])


def marked(cache: Path, unit: str, identity: str) -> bool:
    """Whether the unit's marker is there and carries this identity (the unit is done as it is now)."""
    marker = read_marker(cache, unit)
    return marker is not None and marker.identity == identity


def racy(cache: Path, unit: str, changed_ns: int) -> bool:
    """Whether the unit's marker was written within RACY_NS of `changed_ns` (its input's mtime), or cannot be dated:
    then it cannot prove the input unchanged (a rewrite in the same timestamp tick keeps size and mtime)."""
    for folder in (markers_dir(cache), legacy_tar_dir(cache)):
        name = f"{unit}.json" if folder == markers_dir(cache) else f"{unit.removeprefix('tar-')}.json"
        try:
            return os.lstat(folder / name).st_mtime_ns - changed_ns < RACY_NS
        except OSError:
            continue
    return True


def legacy_tar_marker(cache: Path, unit: str) -> Marker | None:
    """A tar's marker as caches before the one protocol wrote it: `<cache>.inputs/<digest>.json` holding source,
    size, version (the tar's identity), provenance, rows and failed."""
    folder = legacy_tar_dir(cache)
    if folder.is_symlink() or not folder.is_dir():
        return None
    data = _read_json(folder / f"{unit.removeprefix('tar-')}.json")
    types = {"source": str, "size": int, "version": str, "provenance": str, "rows": int, "failed": int}
    if data is None or not all(isinstance(data.get(k), t) for k, t in types.items()):
        return None
    if tar_unit(data["source"]) != unit:
        return None
    identity = tar_identity(data["source"], Identity(data["size"], data["version"]), data["provenance"])
    return Marker(unit, identity, data["rows"], data["failed"], "tar", data["source"])


def matching_tar_marker(cache: Path, source: str, ident: Identity, prov: Provenance) -> Marker | None:
    """The tar's marker if it is for the tar as it is now and for these features, else None. A weights file's size
    decides nothing about the features (format.weights_key) and markers written before it was recorded digest the
    provenance without it: either text names these features (else appending to such a cache redid every tar)."""
    done = read_marker(cache, tar_unit(source))
    if done is None:
        return None
    texts = {prov.to_json(), replace(prov, weights=weights_key(prov.weights)).to_json()}
    return done if done.identity in {tar_identity(source, ident, text) for text in texts} else None


def clear_temps(cache: Path) -> None:
    """Markers being written when a run was killed (temp files of write_atomic)."""
    folder = markers_folder(cache)
    if folder is None:
        return
    for stale in folder.glob(".*.tmp"):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)


def stale_markers(cache: Path, prefix: str, keep: set[str]) -> list[Path]:
    """Markers of units that no longer exist (a folder that shrank is cut into fewer units)."""
    folder = markers_folder(cache)
    if folder is None:
        return []
    return [p for p in folder.glob(f"{prefix}-*.json") if p.stem not in keep and not p.is_symlink()]


FAILED = -2  # a failure record's label in rows_digest (a row's is a class index or -1, unlabeled)
Digests = tuple[str, str]  # (rows_digest with labels, without): what the cache holds of one source


def rows_digest(keys: Sequence[bytes], shas: Sequence[str], labels: Sequence[int] | None = None) -> str:
    """sha256 of a unit's rows and failure records, `keys` strictly increasing: the keys, their content sha256 and
    (unless None: the content alone) their labels, FAILED for a failure record. Each column is length-prefixed
    and joined in C: a 10k-row tar costs microseconds per row, never a Python object per byte."""
    h = hashlib.sha256(b"catdog-cache rows 1" if labels is not None else b"catdog-cache content 1")
    h.update(np.fromiter(map(len, keys), np.int64, len(keys)).tobytes())
    h.update(b"".join(keys))
    h.update(np.fromiter(map(len, shas), np.int64, len(shas)).tobytes())
    h.update("".join(shas).encode("utf-8", "surrogateescape"))
    if labels is not None:
        h.update(np.asarray(labels, np.int64).tobytes())
    return h.hexdigest()


def entries_digests(entries: dict[bytes, tuple[str, int]]) -> Digests:
    """(with labels, content alone) of key -> (sha256, label) entries, in any order."""
    keys = sorted(entries)
    shas = [entries[k][0] for k in keys]
    return rows_digest(keys, shas, [entries[k][1] for k in keys]), rows_digest(keys, shas)


def _columns(keys: list[bytes], shas: list[str], labels: list[int]) -> Digests:
    if not all(map(bytes.__lt__, keys, keys[1:])):  # a cache's rows are sorted by key: a crafted one may not be
        return entries_digests(dict(zip(keys, zip(shas, labels, strict=True), strict=True)))
    return rows_digest(keys, shas, labels), rows_digest(keys, shas)


EMPTY: Digests = _columns([], [], [])


def held_digests(indexes: list[Index], want: set[str]) -> dict[str, Digests]:
    """What the cache holds of each source in `want`, as digests: `indexes` are the cache's own (rows merged and
    sorted) then its unlisted shards in order, which win over it as the next finish will make them (a later shard's
    row or failure replaces the key; within one shard a failure wins). One pass over each index, a source's rows
    sliced at a time: nothing is kept per row. A source absent from the result holds nothing (EMPTY)."""
    touched = {s for idx in indexes[1:] for s in idx.sources} & want  # after a killed run: rebuilt key by key
    out: dict[str, Digests] = {}
    later: dict[str, dict[bytes, tuple[str, int]]] = {s: {} for s in touched}
    for n, idx in enumerate(indexes):
        for source, (keys, shas, labels) in _by_source(idx, want if n == 0 else touched).items():
            if source in later:
                later[source].update(zip(keys, zip(shas, labels, strict=True), strict=True))
            elif keys:
                out[source] = _columns(keys, shas, labels)
    for source, entries in later.items():
        if entries:
            out[source] = entries_digests(entries)
    return out


def _by_source(idx: Index, want: set[str]) -> dict[str, tuple[list[bytes], list[str], list[int]]]:
    """Each wanted source's rows then failure records (label FAILED) in this index: its rows by slicing when they
    are grouped by source (a cache's always are), else through one stable argsort."""
    sids = {s: i for i, s in enumerate(idx.sources) if s in want}
    if not sids:
        return {}
    src = np.asarray(idx.source, np.int64)  # [N]
    order = None if len(src) < 2 or bool((src[1:] >= src[:-1]).all()) else np.argsort(src, kind="stable")
    ssrc = src if order is None else src[order]
    out: dict[str, tuple[list[bytes], list[str], list[int]]] = {}
    for source, sid in sids.items():
        lo, hi = int(np.searchsorted(ssrc, sid, "left")), int(np.searchsorted(ssrc, sid, "right"))
        if order is None:
            out[source] = (idx.paths[lo:hi], idx.sha256[lo:hi], idx.labels[lo:hi].tolist())
        else:
            rows = order[lo:hi].tolist()
            out[source] = ([idx.paths[r] for r in rows], [idx.sha256[r] for r in rows], idx.labels[rows].tolist())
    for s, p, sha, _ in idx.failed:  # a failure after the rows: it wins over a row of the same key in this index
        got = out.get(idx.sources[s])
        if got is not None:
            got[0].append(p)
            got[1].append(sha)
            got[2].append(FAILED)
    return out


def verify_tar_marker(cache: Path, done: Marker, have: Digests) -> Marker | None:
    """A tar marker written before markers had a digest, checked by the cheapest sound rule: the tar streamed and
    each sample's bytes hashed as extract hashes them (no decoding, no backbone), the content digest compared with
    what the cache holds. A match: the marker upgraded with the digest of the cache's rows (their labels as trusted
    as the old marker was), so this is paid once; anything else (other content, an unreadable tar): None, redone.
    The tar's rows in memory, one (key, sha256) each, never its bytes."""
    if not done.source:
        return None
    entries: dict[bytes, tuple[str, int]] = {}
    try:
        with tars.open_tar(done.source) as fh:  # the reader's own open (bounded, no FIFO), as extract's
            for s in tars.read_samples(fh):
                entries[encode_path(s.key)] = (hashlib.sha256(s.data).hexdigest() if s.data is not None else "", 0)
    except Exception:  # unreadable now, however (a URL's client raises its own kinds): redone, and that run says why
        return None
    if entries_digests(entries)[1] != have[1]:
        return None
    upgraded = replace(done, digest=have[0])
    write_marker(cache, upgraded)
    return upgraded
