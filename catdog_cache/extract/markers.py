"""The one resume-marker protocol, for every kind of unit (a slice of a folder's file list, a tar) and every engine.

A unit is done when `<cache>.done/<unit>.json` carries the unit's identity: a digest of what the unit holds as it is
now and of the features' provenance (folder_units.folder_units, tar_identity here), so a changed input or other
settings make the marker stale and the unit is read again. The marker is written last, after the unit's cache shards
are on disk (each temp + rename): a kill before it leaves the unit undone, never half done. Markers come from disk
and are read as hostile input: bounded, checked field by field, never through a link; anything odd means "not done",
and the unit is simply redone.

Caches made before tar markers joined this folder kept them in `<cache>.inputs/<digest>.json` with their own fields:
read_marker falls back to them (legacy_tar_marker), the one place that knows that layout."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cache import Provenance
from ..cache.format import RACY_NS
from ..errors import CacheError
from ..files import read_regular, write_atomic
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
    text = {k: data.get(k, "") for k in ("kind", "source", "run")}
    if not all(isinstance(v, str) for v in text.values()):
        return None
    part = data["part"]
    if "/" in part or "\0" in part or part.startswith("."):
        return None  # a part is a plain name inside the cache's shards folder
    return Marker(unit, data["identity"], data["rows"], data["failures"], text["kind"] or "files", text["source"],
                  part, text["run"])


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
    """The tar's marker if it is for the tar as it is now and for these features, else None."""
    done = read_marker(cache, tar_unit(source))
    return done if done is not None and done.identity == tar_identity(source, ident, prov.to_json()) else None


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
