"""A folder's units for a distributed extract (engines/ray_folder.py; any engine that retries tasks can use them).

A unit is a slice of a folder's sorted file list: its identity is a digest of what it holds (each file's path, label,
size and mtime, the source and the provenance), so an added, removed or changed file gives its unit a new identity.
A task extracts its unit's new or changed files with extract's own pipeline (run_features, rows_of, save_part),
writes them as ONE cache shard named for the run, the unit and the attempt, and writes the unit's done marker last
(extract/markers.py). A unit is done when its marker carries its identity, its cache shard (if still there) holds the
rows the marker counts, and every one of its files is a row or a failure record of the cache: a rerun skips it
without reading a byte of its images. The cache keeps one row per (source, path), the later shard's, so even a task
run twice cannot duplicate a row."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import Provenance, Recorded, encode_path, read_index
from ..cache.shard_state import SHARD_NAME, shards_folder
from ..errors import CacheError
from ..sources.folder import Discovery, Sample
from .config import ExtractConfig, versions
from .folder import rows_of, save_part
from .forward import run_features
from .markers import MARKER_VERSION, Marker, read_marker, write_marker
from .plan import Known, refresh_records
from .rerun import by_stat, verdicts


@dataclass(frozen=True)
class FolderUnit:
    """One unit of input and of resume: today a slice of a folder's sorted file list."""

    index: int
    name: str  # the marker's (and the part's) name: kind, source digest, index
    identity: str  # sha256 of what the shard holds (see cut_folder)
    samples: tuple[Sample, ...]
    classes: tuple[str, ...] = ()  # what the labels index (the cache's classes; empty when unlabeled)
    # [len(samples), 4] int64: the driver's walk's stats of the samples (rerun.py decides known files by them);
    # None: unknown. Not part of the shard's identity (that is `identity`), nor of its equality or hash
    stat: Any = field(default=None, compare=False)


@dataclass
class UnitResult:
    """What one task did, for the driver's report."""

    index: int
    extracted: int = 0
    reused: int = 0
    hashed: int = 0  # known files read to decide (the others were decided by their stat)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason) this run
    failed_before: list[tuple[str, str]] = field(default_factory=list)  # unchanged files known to be unusable
    part: str = ""


def cut_folder(root: Path, samples: list[Sample], source: str, prov: Provenance, size: int,
                  classes: tuple[str, ...] = (), stat: Any = None) -> list[FolderUnit]:
    """The sorted samples in slices of `size` files. Costs one stat per file, never a read."""
    prefix = "files-" + hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    units = []
    for i, start in enumerate(range(0, len(samples), size)):
        chunk = tuple(samples[start : start + size])
        listing = []
        for s in chunk:
            try:
                st = os.stat(root / s.rel)
                listing.append([s.rel, s.label, st.st_size, st.st_mtime_ns])
            except OSError:  # gone or unreadable now: the task records why; the shard is never "done" by stat
                listing.append([s.rel, s.label, -1, -1])
        text = json.dumps([MARKER_VERSION, source, prov.to_json(), listing]  # ensure_ascii: any path encodes
                          + ([list(classes)] if classes else []))  # cat/dog-era markers keep their identity
        units.append(FolderUnit(i, f"{prefix}-{i:06d}", hashlib.sha256(text.encode()).hexdigest(), chunk, classes,
                                 stat[start : start + size] if stat is not None else None))
    return units


def unit_done(cache: Path, unit: FolderUnit, known: Known) -> bool:
    """Marker with this identity, its part (while not yet assembled) intact, every file recorded with its content,
    and every recorded file unchanged by the rule the local engine applies (rerun.by_stat: size, mtime, inode,
    device and ctime as the cache recorded them, racy stats never trusted): the identity alone digests size and
    mtime, so a file replaced by a rename with both put back kept its stale row under Ray while one process saw it.
    No walk's stats (unit.stat None): not done."""
    marker = read_marker(cache, unit.name)
    if marker is None or marker.identity != unit.identity or unit.stat is None:
        return False
    # Every file's row (or failure record of read content) is the file as it is now, by its recorded stat: that,
    # not a digest in the marker, proves the cache holds the unit's current rows, so a cache restored from a backup
    # beside newer markers has other stats and the unit runs. A failure without content (unreadable then) proves
    # nothing: the local engine reads such a file again, and so does the unit.
    keys = [encode_path(s.rel) for s in unit.samples]
    if not all(k in known.files for k in keys):
        return False
    disc = Discovery.of(Path(), "", list(unit.samples), stat=unit.stat)
    _, changed = by_stat(disc, known.files, range(len(keys)), keys=keys)
    if changed:
        return False
    if not marker.part:
        return True
    if not SHARD_NAME.fullmatch(f"{marker.part}.h5"):
        return False
    # the part is a shard in the shards folder, listed in the index or not yet: immutable either way, so its counts
    # are the marker's (a compact merges it away; then the rows recorded above are what counts)
    folder = shards_folder(cache)
    part = folder / f"{marker.part}.h5" if folder is not None else None
    if part is not None and part.is_file() and not part.is_symlink():
        try:
            idx = read_index(part)
        except CacheError:
            return False
        return (len(idx.paths), len(idx.failed)) == (marker.rows, marker.failures)
    return True


def run_unit(unit: FolderUnit, root: Path, cache: Path, cfg: ExtractConfig, prov: Provenance, source: str,
              run_id: str, known: Recorded, reasons: dict[bytes, str], model: torch.nn.Module | None = None,
              kill_hook: str = "", scan_ns: int = 0, checksum: bool = False) -> UnitResult:
    """Extract one input shard: decide the files the cache already knows by extract's rule (rerun.py: by stat, else
    by hash; unchanged ones are reused), extract the rest, write them (and the refresh records of files found
    unchanged by hashing) as one part, then the marker. `known`/`reasons` need only hold this shard's files;
    `scan_ns`: when the driver's walk started."""
    result = UnitResult(unit.index)
    disc = Discovery.of(root, "", list(unit.samples), stat=unit.stat)
    keys = [encode_path(s.rel) for s in unit.samples]
    found = verdicts(disc, known, [i for i, k in enumerate(keys) if k in known], scan_ns, checksum, keys=keys)
    result.reused, result.hashed = len(found.unchanged), found.hashed
    result.failed_before = [(disc.samples[i].rel, reasons[keys[i]]) for i in sorted(found.unchanged)
                            if keys[i] in reasons]
    mine = [i for i in range(len(keys)) if i not in found.unchanged]
    todo: list[Sample] = [unit.samples[i] for i in mine]
    batches = []
    for n, batch in enumerate(run_features(root, [s.rel for s in todo], cfg, model)):
        batches.append(batch)
        if n == 0:
            maybe_die(kill_hook, unit.index, "batch")
    rows = rows_of(batches, todo, unit.stat[mine] if unit.stat is not None else None)
    rows.refresh = refresh_records(found, keys, known) if found.refresh else None
    result.extracted = len(rows.paths)
    result.failed = [(os.fsdecode(p), why) for p, why in zip(rows.failed_paths, rows.failed_reasons, strict=True)]
    if todo or rows.refresh is not None:
        # A fresh name per attempt, never the same name twice: an attempt Ray gave up on (a lost node, a network
        # split) may still be running and rename its part in after the driver listed the retry's in the index; with
        # one name per shard that would change a listed shard under the index (every reader then refuses the
        # cache). Two attempts' parts hold the same files: the later name sorts later and its rows win, the other's
        # are superseded rows (no duplicate in any read; `compact` reclaims them). The marker names this attempt's.
        result.part = f"part-{run_id}-{unit.name}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        save_part(cache, result.part, cfg, prov, source, rows, versions(), unit.classes, scan_ns)
    marker = Marker(unit.name, unit.identity, len(rows.paths), len(rows.failed_paths), "files", source,
                    result.part, run_id)
    maybe_die(kill_hook, unit.index, "marker")
    write_marker(cache, marker)  # last: the unit is done
    return result


def maybe_die(hook: str, index: int, stage: str) -> None:
    """Test hook, "<shard index>:<stage>:<flag file>[,...]": the first attempt of that shard kills its own process
    after one batch (stage "batch") or between its part and its marker ("marker"), as a lost node or the OOM killer
    would; the flag file, created at the kill, lets later attempts live."""
    for entry in filter(None, hook.split(",")):
        which, at, flag = entry.split(":", 2)
        if (which, at) == (str(index), stage):
            with contextlib.suppress(FileExistsError):
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.kill(os.getpid(), signal.SIGKILL)
