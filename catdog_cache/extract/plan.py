"""Planning an extract: what the cache already holds for a folder (from its indexes alone), which files are new or
changed (by stat, else by hash: rerun.py), what to drop, and the folder's labels mapped onto the cache's classes.
One planning path for the local engine, torchrun and the Ray driver; no image is read here except to hash. The same
rules, decided read-only (up_to_date), tell predict and preview whether an input is already cached."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache import (
    MAX_SOURCES,
    Index,
    Provenance,
    Recorded,
    Refresh,
    encode_path,
    encode_paths,
    list_parts,
    merge_classes,
    read_index,
    recorded,
)
from ..cache.format import CAT_DOG, MAX_CLASS_NAME, MAX_CLASSES, STAT_WIDTH
from ..engines.torchrun import Dist
from ..errors import InputError, ProvenanceMismatch
from ..files import plural, printable
from ..sources.decode import decoder_of
from ..sources.folder import UNLABELED, Discovery, discover
from ..sources.spec import Identity, identity, is_tar_input, is_url, refuse_missing, resolve_inputs
from ..sources.tars import UNREADABLE
from .config import ExtractReport, Progress
from .markers import EMPTY, Digests, Marker, clear_temps, held_digests, matching_tar_marker, racy, verify_tar_marker
from .rerun import Verdicts, verdicts


@dataclass
class Known:
    """What the cache and its parts hold for one source folder, from their indexes alone (no image is read)."""

    files: Recorded = field(default_factory=lambda: recorded([], ""))  # path -> (sha256, trusted stat), this source
    reasons: dict[bytes, str] = field(default_factory=dict)  # path -> why an earlier run could not use it
    class_lists: list[tuple[list[str], bool]] = field(default_factory=list)  # per index: (classes, has labels)
    cache: Index | None = None  # the cache's own index as read (a run with nothing to do reads it once)
    shape: tuple[int, ...] = ()  # the cache's [V, D] (a refresh shard's empty features match it)
    # the cache's own rows, made a set on first use (a rerun of an unchanged folder needs none)
    cached_rows: list[bytes] = field(default_factory=list)

    @functools.cached_property
    def cached(self) -> set[bytes]:
        """Rows of the cache itself (not its parts): what --prune drops."""
        return set(self.cached_rows)


def known_files(cache: Path, prov: Provenance, source: str, parts: bool = True) -> Known:
    """Read the cache's and its parts' indexes, refusing any made with another provenance. The one reading of what
    is known, for extract's plan (local and torchrun), the Ray driver and the read-only pending(). `parts`: False
    reads the cache's own index alone and removes nothing (list_parts clears unfinished temp parts)."""
    k = Known()
    indexes = []
    for path in ([cache] if cache.exists() else []) + (list_parts(cache) if parts else []):
        idx = read_index(path)
        indexes.append(idx)
        k.cache = idx if path == cache else k.cache
        k.shape = idx.shape[1:]
        k.class_lists.append((idx.classes, idx.labeled))
        diffs = idx.provenance.differences(prov, "the cache", "this extract")
        if diffs:
            if idx.provenance.arch != prov.arch or idx.provenance.layer != prov.layer:  # the rest follows from it
                diffs = [d for d in diffs if d.startswith(("arch", "layer"))]
            suggestion = cache.with_name(f"{prov.arch.replace(':', '-')}-{prov.layer}.h5")
            raise ProvenanceMismatch(f"{path} holds features made differently ({'; '.join(diffs)}): give --cache a new "
                                     f"file for these settings (e.g. --cache {suggestion}), or leave out the options "
                                     "that differ: adding to a cache uses its own settings "
                                     f"({matching_flags(idx.provenance)})")
        rows = idx.paths if idx.sources == [source] else \
            [p for s, p in zip(idx.source.tolist(), idx.paths, strict=True) if idx.sources[s] == source]
        k.cached_rows = rows if path == cache else k.cached_rows
        if k.reasons or idx.failed:
            held = set(rows)
            k.reasons = {p: why for p, why in k.reasons.items() if p not in held}  # a later part holds it: fixed
            k.reasons |= {p: why for s, p, sha, why in idx.failed if idx.sources[s] == source and sha and p not in held}
    k.files = recorded(indexes, source)
    return k


def removals(k: Known, disc: Discovery, source: str, prune: bool, report: ExtractReport,
             keys: list[bytes] | None = None, aligned: bool = False) -> set[tuple[str, bytes]]:
    """Files the cache holds that the folder no longer has: reported, and dropped under --prune. `aligned`: keys
    equal k.files.paths, every path recorded of this folder (the cache's rows among them): none was removed."""
    keys = keys if keys is not None else encode_paths(disc.rels)
    report.removed = [] if aligned else sorted(os.fsdecode(p) for p in k.cached.difference(keys))
    report.pruned = prune and bool(report.removed)
    return {(source, encode_path(r)) for r in report.removed} if prune else set()


@dataclass
class Plan:
    todo: list[int]  # indices into disc.samples: new or changed files
    drop: set[tuple[str, bytes]]  # deleted files' keys (with --prune)
    refresh: Refresh | None = None  # known files found unchanged by hashing, with the stat this run saw
    shape: tuple[int, ...] = ()  # the cache's [V, D]: a refresh shard's (empty) features match it
    cache: Index | None = None  # the cache's index as planned (a run with nothing to do reads it once)


def plan_folder(disc: Discovery, source: str, cache: Path, prov: Provenance, report: ExtractReport, prune: bool,
          progress: Progress | None, dist: Dist | None = None, checksum: bool = False, scan_ns: int = 0) -> Plan:
    """What this run must extract (new or changed files) and drop (deleted files, with --prune). Known files are
    unchanged when their stat says so, else when their hash does (rerun.py). Under torchrun each rank decides a
    slice of the already-known files (by its own walk's stats) and the ranks share the verdicts."""
    k = known_files(cache, prov, source)
    onto_cache_classes(disc, merge_classes(k.class_lists, str(cache)), cache)
    keys = encode_paths(disc.rels)
    found, aligned = folder_verdicts(disc, k, keys, scan_ns, checksum, progress, dist)
    todo = np.ones(len(keys), dtype=bool)  # [N]
    todo[list(found.unchanged)] = False
    plan = Plan(np.flatnonzero(todo).tolist(), set(), cache=k.cache)
    report.reused = len(keys) - len(plan.todo)
    report.hashed = found.hashed
    report.failed_before = failed_before(k, disc, found.unchanged, keys)
    plan.drop = removals(k, disc, source, prune, report, keys, aligned)
    if found.refresh:
        plan.refresh = refresh_records(found, keys, k.files)
        plan.shape = k.shape
    return plan


def folder_verdicts(disc: Discovery, k: Known, keys: list[bytes], scan_ns: int = 0, checksum: bool = False,
                    progress: Progress | None = None, dist: Dist | None = None) -> tuple[Verdicts, bool]:
    """Which of the folder's files (`keys`: their encoded paths) the cache holds unchanged: recorded, and the same by
    stat, else by hash (rerun.py); and whether `keys` are exactly the recorded paths in order (`aligned`). The one
    rule for extract's plan and for the read-only check (up_to_date); under torchrun each rank decides a slice of
    the known files (by its own walk's stats) and the ranks share the verdicts."""
    # The usual rerun: the folder holds exactly the files the cache recorded, in the order recorded. One list
    # comparison (in C) then spares a lookup per file. Checked, not assumed: str order (the folder's) and byte order
    # differ for surrogate-escaped names, and a cache grown over several runs lists its parts' rows in turn.
    aligned = keys == k.files.paths
    candidates = range(len(keys)) if aligned else [i for i, key in enumerate(keys) if key in k.files]
    found = verdicts(disc, k.files, dist.share(candidates) if dist else candidates, scan_ns, checksum, progress, keys,
                     aligned)
    if dist:
        shared = dist.gather((found.unchanged, found.refresh, found.hashed))
        found = Verdicts(set().union(*(u for u, _, _ in shared)), {i: st for _, r, _ in shared for i, st in r.items()},
                         sum(h for _, _, h in shared))
    return found, aligned


def failed_before(k: Known, disc: Discovery, unchanged: set[int] | list[int], keys: list[bytes]
                  ) -> list[tuple[str, str]]:
    """Unchanged files an earlier run could not use; --strict must see these too: skipped as known, they are still
    unusable files of the folder."""
    if not k.reasons:
        return []
    return [(disc.rels[i], k.reasons[keys[i]]) for i in sorted(unchanged) if keys[i] in k.reasons]


def refresh_records(found: Verdicts, keys: list[bytes], files: Recorded) -> Refresh:
    """Known files found unchanged by hashing, with the stat this run saw (rerun.py): a record of a shard."""
    done = sorted(found.refresh)
    paths = [keys[i] for i in done]
    return Refresh(np.zeros(len(paths), np.int64), paths, [files.sha256(p) for p in paths],
                   np.array([found.refresh[i] for i in done], np.int64).reshape(-1, STAT_WIDTH))


def onto_cache_classes(disc: Discovery, have: list[str], cache: Path) -> None:
    """Relabel the folder's samples with the cache's class ids (by name: a folder of dog/ alone, or of some of a
    cache's classes, keeps the cache's numbering). A class the cache does not know is refused, not appended: the
    heads already trained on the cache have one output per class and its labels index those classes, so a new
    index would make every head of it unable to score its own training cache (predict and fit refuse mixed class
    sets) while looking like it still fits."""
    if not have or not disc.classes:  # a cache without labels takes the folder's classes; unlabeled rows need none
        disc.classes = disc.classes or tuple(have)
        return
    new = [c for c in disc.classes if c not in have]
    if new:
        shown = ", ".join(printable(c) for c in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        raise InputError(f"{disc.root} has classes the cache {cache} does not have ({shown}); its classes are "
                         f"{', '.join(printable(c) for c in have)[:300]}. A cache's classes are fixed by its first "
                         "labeled folder (heads trained on it have one output per class): extract every class folder "
                         "into a new cache (--cache NEW.h5) instead")
    ids = [have.index(c) for c in disc.classes]
    if ids != list(range(len(ids))):  # the same numbering (the common case) needs no per-file work
        lookup = np.array(ids + [UNLABELED], np.int64)  # [C + 1]: label -1 reads the last entry, staying -1
        disc.relabel(lookup[disc.labels])
    disc.classes = tuple(have)


def matching_flags(prov: Provenance) -> str:
    """The extract options that reproduce a cache's provenance (for the refusal message)."""
    kind, _, rest = prov.weights.partition(":")
    weights = {"imagenet": "--weights imagenet", "random": f"--weights random --seed {rest.partition('=')[2]}",
               "file": f"--weights FILE (the file with sha256 {rest.partition('=')[2][:12]}…)"}.get(kind, prov.weights)
    flags = [f"--backbone {prov.arch}", f"--layer {prov.layer}", weights, f"--views {prov.views}",
             f"--dtype {prov.dtype}", f"--precision {prov.precision}", f"--decoder {decoder_of(prov.transform)}"]
    return " ".join(flags)


def _check_provenance(path: Path, have: Provenance, prov: Provenance, cache: Path) -> None:
    diffs = have.differences(prov, "the cache", "this extract")
    if diffs:
        suggestion = cache.with_name(f"{prov.arch.replace(':', '-')}-{prov.layer}.h5")
        raise ProvenanceMismatch(f"{path} holds features made differently ({'; '.join(diffs)}): give --cache a new "
                                 f"file for these settings (e.g. --cache {suggestion}), or leave out the options that "
                                 f"differ: adding to a cache uses its own settings ({matching_flags(have)})")


def plan_tars(shards: list[str], cache: Path, prov: Provenance, report: ExtractReport, checksum: bool = False
              ) -> tuple[list[int], list[Identity], dict[str, set[bytes]], list[str]]:
    """Shards to read (indices), every shard's identity, the keys the cache already holds for each shard to read
    (to drop the ones a changed shard no longer has), and the cache's classes ([] when it holds no labels). Shards
    whose done marker matches are skipped unread (none with `checksum`). Refused before any is read: more sources
    than a cache holds, local shards that do not exist."""
    held, class_lists, known, digests = tar_known(cache, prov, want=set(shards))
    new = len(set(shards) - known)  # each shard becomes a source, a failure record's too
    if len(known) + new > MAX_SOURCES:  # else found only when the index is written, after all the work
        raise InputError(f"{printable(str(cache))} would hold {len(known) + new:,} sources ({len(known):,} already, "
                         f"{plural(new, 'new shard')}); a cache holds at most {MAX_SOURCES:,}: extract these into "
                         "another cache (--cache OTHER.h5), or pack the shards into fewer, larger tars")
    refuse_missing(shards)
    clear_temps(cache)  # a marker being written when a run was killed
    todo: list[int] = []
    idents: list[Identity] = []
    for i, source in enumerate(shards):
        try:
            ident = identity(source)
        except OSError as e:
            idents.append(Identity(-1, ""))
            report.failed.append((source, f"{UNREADABLE}: {e.strerror or e}"))
            continue
        idents.append(ident)
        done = None if checksum else tar_done(cache, source, ident, prov, digests, verify=True)
        if done:
            report.reused += done.rows
            report.reused_failed += done.failures
            continue
        todo.append(i)
    have = merge_classes([c for c in class_lists if c[1]], str(cache)) if any(h for _, h in class_lists) else []
    return todo, idents, {shards[i]: held[shards[i]] for i in todo if shards[i] in held}, have


def tar_known(cache: Path, prov: Provenance, parts: bool = True, want: set[str] = frozenset()
              ) -> tuple[dict[str, set[bytes]], list[tuple[list[str], bool]], set[str], dict[str, Digests]]:
    """What the cache and its parts hold of tar shards, from their indexes alone: each source's keys (as rows or
    failure records), each index's (classes, has labels), every source listed, and the digests of what it holds of
    each source in `want` (markers.held_digests: what a marker must match). Refuses indexes made with another
    provenance. `parts`: as known_files'."""
    held: dict[str, set[bytes]] = {}
    class_lists: list[tuple[list[str], bool]] = []
    known: set[str] = set()
    indexes = []
    for path in ([cache] if cache.exists() else []) + (list_parts(cache) if parts else []):
        idx = read_index(path)
        indexes.append(idx)
        _check_provenance(path, idx.provenance, prov, cache)
        class_lists.append((idx.classes, idx.labeled))
        known.update(idx.sources)
        keys = idx.keys()
        for s, p in keys:
            held.setdefault(s, set()).add(p)
        for s, p, _, _ in idx.failed:
            held.setdefault(idx.sources[s], set()).add(p)
    return held, class_lists, known, held_digests(indexes, want) if want else {}


def tar_done(cache: Path, source: str, ident: Identity, prov: Provenance, digests: dict[str, Digests],
             verify: bool = False) -> Marker | None:
    """The shard's done marker when a run need not read the shard: the marker matches the shard as it is now and
    these features, the cache holds exactly the rows it vouches for (its digest; `digests`: tar_known's), and the
    marker was written well after the shard's last change. A marker without a digest (written before markers had
    one) proves nothing about the rows: with `verify` (a writer, holding the lock) the tar is hashed and compared
    with the cache's rows, and a match upgrades the marker (markers.verify_tar_marker); read-only, it is not done.
    The last rule is the racy rule of rerun.py, for a shard whose mtime is a whole second (a
    file system or an archiver that keeps whole seconds): there a rewrite within RACY_NS of the marker can keep
    the same size and mtime, so such a marker proves nothing and the shard is read again. A nanosecond mtime changes
    with any rewrite; re-reading every fresh shard for it would cost a whole tar per shard."""
    done = matching_tar_marker(cache, source, ident, prov)
    if done is None:
        return None
    whole_second = not is_url(source) and int(ident.version) % 10**9 == 0
    if whole_second and racy(cache, done.unit, int(ident.version)):
        return None
    have = digests.get(source, EMPTY)
    if done.digest:
        return done if done.digest == have[0] else None
    return verify_tar_marker(cache, done, have) if verify else None


@dataclass
class Pending:
    """What extract(data, cache) would still read, decided read-only (pending()): nothing when falsy."""

    new: int = 0  # files (tar shards) the cache does not hold (as they are now, for shards)
    changed: int = 0  # files held, but changed since (counted only when none is new)
    total: int = 0  # files (shards) the input has
    other: str = ""  # another reason: no cache yet, parts waiting for assembly, other features

    def __bool__(self) -> bool:
        return bool(self.new or self.changed or self.other)


def pending(data: str | os.PathLike[str], cache: Path, prov: Provenance, progress: Progress | None = None,
            disc: Discovery | None = None, shards: list[str] | None = None, parts: bool = True) -> Pending:
    """extract's plan for `data` into `cache`, decided read-only: no lock taken, no folder made, no stale part or
    marker removed, so checking an already cached input works on read-only media and beside a running extract.
    A folder: every file recorded with these features and unchanged (folder_verdicts' rule); tar shards: every
    shard done (tar_done's rule). `parts`: parts waiting for assembly count as work (False: the cache's own index
    is all that counts, as for scoring from it). `disc` (a folder's walk) or `shards` (resolved tar input) spare a
    second walk or listing read."""
    cache = cache.resolve()
    if not cache.is_file():
        return Pending(other="no cache yet")
    if parts and list_parts(cache, clean=False):  # shards not yet in the index: extract lists them
        return Pending(other="saved parts wait for assembly")
    if disc is None and shards is None and is_tar_input(data):
        shards = resolve_inputs(data)
    try:
        if shards is not None:
            return _shards_pending(shards, cache, prov)
        disc = disc if disc is not None else discover(data)
        k = known_files(cache, prov, str(disc.root.resolve()), parts=False)
    except ProvenanceMismatch as e:  # extract says how they differ
        return Pending(other=str(e))
    keys = encode_paths(disc.rels)
    new = 0 if keys == k.files.paths else sum(key not in k.files for key in keys)
    if new:  # nothing need be hashed to know extract has work
        return Pending(new=new, total=len(keys))
    found, _ = folder_verdicts(disc, k, keys, progress=progress)
    return Pending(changed=len(keys) - len(found.unchanged), total=len(keys))


def up_to_date(data: str | os.PathLike[str], cache: Path, prov: Provenance, progress: Progress | None = None,
               disc: Discovery | None = None, shards: list[str] | None = None) -> bool:
    """Whether extract(data, cache) would read nothing (pending() is empty). Under torchrun the ranks decide
    together, in extract itself: False."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        return False
    return not pending(data, cache, prov, progress, disc, shards)


def _shards_pending(shards: list[str], cache: Path, prov: Provenance) -> Pending:
    _, _, _, digests = tar_known(cache, prov, parts=False, want=set(shards))
    new = 0
    for source in shards:
        try:
            ident = identity(source)
        except OSError:  # missing or unreadable: extract refuses or records it
            new += 1
            continue
        new += tar_done(cache, source, ident, prov, digests) is None
    return Pending(new=new, total=len(shards))


def tar_classes(given: Sequence[str] | None, have: list[str], cache: Path) -> tuple[str, ...]:
    """The classes a run's labels index: `given` (extract --classes, in .cls index order), else the cache's own,
    else cat, dog. Names are lower-cased as class folders are. A cache's classes are fixed by its first labeled
    input (plan.onto_cache_classes says why): --classes that differ from them are refused, not merged."""
    if given is None:
        return tuple(have) or CAT_DOG
    names = [c.strip().lower() for c in given]
    bad = [c for c in names if not c or len(c.encode("utf-8", "surrogateescape")) > MAX_CLASS_NAME]
    if bad or len(set(names)) != len(names) or not 1 <= len(names) <= MAX_CLASSES:
        raise InputError(f"--classes: expected 1 to {MAX_CLASSES} distinct, non-empty class names (comma-separated, "
                         f"in .cls index order), got {printable(','.join(given))[:200]!r}")
    if have and names != have:
        raise InputError(f"--classes {printable(','.join(names))[:200]}: the cache {cache} labels with "
                         f"{printable(','.join(have))[:200]}; a cache's classes are fixed by its first labeled input: "
                         "leave --classes out to use them, or extract into a new cache (--cache NEW.h5)")
    return tuple(names)

