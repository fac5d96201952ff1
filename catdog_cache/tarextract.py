"""Runner for tar-shard input: which shards are done -> extract the others into parts -> done markers -> the index.

A row's source is its shard (absolute local path or URL) and its path the sample's key. A shard is the resume unit:
when its last part is on disk, a done marker `<cache>.inputs/<hash>.json` records its identity (size + mtime_ns, or
size + ETag/mtime for a URL; see shards.Identity); a rerun skips a shard whose marker matches without opening it.
A shard cut short by a kill has no marker and is read again; its new rows supersede those saved before (later
parts win), and when a changed shard is redone, keys it no longer holds are dropped."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbone import Preset
from .cache import MAX_SOURCES, Provenance, Rows, encode_path, finish, list_parts, merge_classes, read_index, write_part
from .discover import CLASSES, MAX_CLASS_NAME, MAX_CLASSES
from .distributed import from_env
from .errors import CacheError, CatdogError, InputError, Interrupted, ProvenanceMismatch
from .extract import (
    PART_SECONDS,
    ExtractConfig,
    ExtractReport,
    Progress,
    _finish,
    _lock_once,
    no_rows,
    raise_shared,
    run_dataset,
    versions,
)
from .files import plural, printable, read_regular, write_atomic
from .pipeline import Batch, PartWriter, default_workers
from .plan import matching_flags
from .shardspec import Identity, identity, is_url, refuse_missing, resolve_inputs
from .tars import NO_IMAGE, UNREADABLE, End, TarShards

MARKER_BYTES = 64 * 2**10


def markers_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".inputs")


def _marker(cache: Path, source: str, create: bool = False) -> Path:
    folder = markers_dir(cache)
    if folder.is_symlink():  # a planted link would send markers elsewhere
        raise CacheError(f"{folder} is a symbolic link; refusing to write done markers through it (remove it)")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hashlib.sha256(source.encode('utf-8', 'surrogateescape')).hexdigest()[:40]}.json"


@dataclass(frozen=True)
class Done:
    """A shard's done marker: which shard, as what identity, with which features, holding how many rows."""

    source: str
    identity: Identity
    provenance: str
    rows: int
    failed: int

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "size": self.identity.size, "version": self.identity.version,
                           "provenance": self.provenance, "rows": self.rows, "failed": self.failed})


def read_marker(cache: Path, source: str) -> Done | None:
    """The shard's marker, or None when absent, unreadable or not one of ours (the shard is then redone)."""
    try:
        data = json.loads(read_regular(_marker(cache, source), MARKER_BYTES))
        d = Done(data["source"], Identity(data["size"], data["version"]), data["provenance"], data["rows"],
                 data["failed"])
        ok = all(isinstance(v, t) for v, t in ((d.source, str), (d.identity.size, int), (d.identity.version, str),
                                                (d.provenance, str), (d.rows, int), (d.failed, int)))
        return d if ok and d.source == source else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def matching_marker(cache: Path, source: str, ident: Identity, prov: Provenance) -> Done | None:
    """The shard's done marker if it is for the shard as it is now and for these features, else None."""
    done = read_marker(cache, source)
    return done if done is not None and done.identity == ident and done.provenance == prov.to_json() else None


@dataclass
class ShardResult:
    """One shard's outcome in this run: rows and failure records written, and whether it is done (marked)."""

    source: str
    rows: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    done: bool = False
    error: str = ""  # the shard could not be read: retried by the next run
    keys: set[bytes] = field(default_factory=set)  # every key seen (kept only when asked: stale-key dropping)


class _Shards:
    """Writer-thread state: batches routed into per-shard rows, a part written per shard every `part_rows` rows
    (a part holds one source), and a shard's marker written once its last part is on disk."""

    def __init__(self, sources: list[str], idents: list[Identity], cache: Path, cfg: ExtractConfig,
                 prov: Provenance, track: set[int], tag: str, classes: tuple[str, ...],
                 after_part: Callable[[], None] | None = None) -> None:
        self.sources, self.idents, self.cache, self.cfg, self.prov, self.track = sources, idents, cache, cfg, prov, \
            track
        self.classes = classes
        self.after_part = after_part  # a Ray actor's test hook: dies between a part and the shard's marker
        self.results = [ShardResult(s) for s in sources]
        self.rows: dict[int, Rows] = {}
        self.ends: dict[int, int] = {}
        self.run_id = f"{time.time_ns():020d}-{os.getpid()}{tag}"
        self.n_parts = 0
        self.info = versions()

    def _buffer(self, i: int, key: str) -> Rows:
        if i in self.track:
            self.results[i].keys.add(encode_path(key))
        return self.rows.setdefault(i, Rows())

    def write(self, batches: list[Batch]) -> None:
        for refs, feats, shas, failures in batches:
            for ref, row, sha in zip(refs, feats, shas, strict=True):
                rows = self._buffer(ref.shard, ref.key)
                rows.features.append(row)  # [V, D]
                rows.paths.append(encode_path(ref.key))
                rows.labels.append(ref.label)
                rows.sha256.append(sha)
                self.results[ref.shard].rows += 1
            for ref, sha, reason in failures:
                if isinstance(ref, End):
                    self._end(ref)
                    continue
                rows = self._buffer(ref.shard, ref.key)
                rows.failed_paths.append(encode_path(ref.key))
                rows.failed_sha256.append(sha)
                rows.failed_reasons.append(reason)
                self.results[ref.shard].failed.append((ref.key, reason))
        for i in [i for i, r in self.rows.items() if len(r) >= self.cfg.part_rows]:
            self._part(i)

    def _end(self, end: End) -> None:
        result = self.results[end.shard]
        if end.error and not result.error:
            result.error = end.error
            rows = self._buffer(end.shard, "")  # listed by `info --failures`; dropped once the shard is read
            rows.failed_paths.append(b"")
            rows.failed_sha256.append("")
            rows.failed_reasons.append(end.error)
        self.ends[end.shard] = self.ends.get(end.shard, 0) + 1
        if self.ends[end.shard] < end.readers:
            return
        self._part(end.shard)
        if not result.error:
            marker = Done(result.source, self.idents[end.shard], self.prov.to_json(), result.rows, len(result.failed))
            write_atomic(_marker(self.cache, result.source, create=True), marker.to_json().encode())
            result.done = True

    def _part(self, i: int) -> None:
        rows = self.rows.pop(i, None)
        if not rows:
            return
        dim = rows.features[0].shape[-1] if rows.features else self.cfg.resolve().dim
        write_part(self.cache, f"part-{self.run_id}-{self.n_parts:06d}", self.prov, self.sources[i], rows, self.info,
                   (len(self.cfg.views), dim), self.cfg.weights.path, self.classes)
        self.n_parts += 1
        if self.after_part:
            self.after_part()

    def flush(self) -> None:
        """At the end of a run (the writer thread has stopped): parts for what unfinished shards read so far."""
        for i in list(self.rows):
            self._part(i)


def default_tar_workers(idents: list[Identity]) -> int:
    """As for folders (pipeline.default_workers), the image count estimated from the shards' bytes: at 16 KiB per
    image (small for a photo: the estimate errs towards workers), under 1 MiB in all decodes in process."""
    return default_workers(sum(max(x.size, 0) for x in idents) // (16 * 2**10))


def extract_shard_list(sources: list[str], idents: list[Identity], cache: Path, cfg: ExtractConfig,
                       progress: Progress | None = None, model: torch.nn.Module | None = None,
                       preset: Preset | None = None, track: set[int] = frozenset(), tag: str = "",
                       classes: Sequence[str] = CLASSES, after_part: Callable[[], None] | None = None
                       ) -> list[ShardResult]:
    """Read these shards (streamed, decoded in loader workers) into parts next to `cache`, and write the done
    marker of each shard read to its end. No lock, no index: the caller holds the cache's lock and lists the parts
    (extract_shards), or runs this as one task per shard and merges afterwards (e.g. a Ray engine). Rerunning a
    shard is harmless: its rows replace the earlier ones (later parts win), never duplicate them. Labels index
    `classes` (tar_classes: the cache's own when it has some)."""
    cfg.check()
    prov = cfg.provenance()
    if model is None or preset is None:
        backbone = cfg.resolve()
        model = model if model is not None else backbone.build(cfg.weights)
        preset = backbone.preset
    state = _Shards(sources, idents, cache, cfg, prov, set(track), tag, tuple(classes), after_part)
    workers = cfg.workers if cfg.workers >= 0 else default_tar_workers(idents)
    delay = float(os.environ.get("CATDOG_BATCH_DELAY", "0"))  # test hook: slow a run down to kill it midway
    writer = PartWriter(state.write, cfg.part_rows, PART_SECONDS)
    ended: dict[int, int] = {}
    try:
        dataset = TarShards(sources, cfg.views, preset, cfg.decoder, classes)
        for batch in run_dataset(dataset, 0, workers, cfg, model, preset):
            writer.put(batch)
            for ref, _, _ in batch[3]:
                if isinstance(ref, End):
                    ended[ref.shard] = ended.get(ref.shard, 0) + 1
                    if progress and ended[ref.shard] == ref.readers:
                        progress("shards", sum(ended[i] == ref.readers for i in ended), len(sources))
            if delay:
                time.sleep(delay)
    finally:
        writer.close()  # every batch received is written (or the write's error raised)
    state.flush()
    return state.results


def extract_shard(source: str, cache: Path, cfg: ExtractConfig, model: torch.nn.Module | None = None,
                  tag: str = "", classes: Sequence[str] = CLASSES) -> ShardResult:
    """One shard -> its parts and done marker (a task of a distributed engine: one per input shard). Raises OSError
    when the shard cannot be stat'ed; `tag` keeps part names apart between concurrent tasks."""
    return extract_shard_list([source], [identity(source)], cache, cfg, model=model, tag=tag, classes=classes)[0]


def _check_provenance(path: Path, have: Provenance, prov: Provenance, cache: Path) -> None:
    diffs = have.differences(prov, "the cache", "this extract")
    if diffs:
        suggestion = cache.with_name(f"{prov.arch.replace(':', '-')}-{prov.layer}.h5")
        raise ProvenanceMismatch(f"{path} holds features made differently ({'; '.join(diffs)}): give --cache a new "
                                 f"file for these settings (e.g. --cache {suggestion}), or leave out the options that "
                                 f"differ: adding to a cache uses its own settings ({matching_flags(have)})")


def _plan(shards: list[str], cache: Path, prov: Provenance, report: ExtractReport
          ) -> tuple[list[int], list[Identity], dict[str, set[bytes]], list[str]]:
    """Shards to read (indices), every shard's identity, the keys the cache already holds for each shard to read
    (to drop the ones a changed shard no longer has), and the cache's classes ([] when it holds no labels). Shards
    whose done marker matches are skipped unread. Refused before any is read: more sources than a cache holds,
    local shards that do not exist."""
    held: dict[str, set[bytes]] = {}  # source -> keys held as rows or failure records, in the cache and its parts
    class_lists: list[tuple[list[str], bool]] = []
    known: set[str] = set()  # the sources the cache and its parts list already
    for path in ([cache] if cache.exists() else []) + list_parts(cache):
        idx = read_index(path)
        _check_provenance(path, idx.provenance, prov, cache)
        class_lists.append((idx.classes, idx.labeled))
        known.update(idx.sources)
        keys = idx.keys()
        for s, p in keys:
            held.setdefault(s, set()).add(p)
        for s, p, _, _ in idx.failed:
            held.setdefault(idx.sources[s], set()).add(p)
    new = len(set(shards) - known)  # each shard becomes a source, a failure record's too
    if len(known) + new > MAX_SOURCES:  # else found only when the index is written, after all the work
        raise InputError(f"{printable(str(cache))} would hold {len(known) + new:,} sources ({len(known):,} already, "
                         f"{plural(new, 'new shard')}); a cache holds at most {MAX_SOURCES:,}: extract these into "
                         "another cache (--cache OTHER.h5), or pack the shards into fewer, larger tars")
    refuse_missing(shards)
    folder = markers_dir(cache)
    if folder.is_dir() and not folder.is_symlink():
        for stale in folder.glob(".*.tmp"):  # a marker being written when a run was killed
            if stale.is_file() and not stale.is_symlink():
                stale.unlink(missing_ok=True)
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
        done = matching_marker(cache, source, ident, prov)
        if done and (source in held or done.rows + done.failed == 0):
            report.reused += done.rows
            report.reused_failed += done.failed
            continue
        todo.append(i)
    have = merge_classes([c for c in class_lists if c[1]], str(cache)) if any(h for _, h in class_lists) else []
    return todo, idents, {shards[i]: held[shards[i]] for i in todo if shards[i] in held}, have


def tar_classes(given: Sequence[str] | None, have: list[str], cache: Path) -> tuple[str, ...]:
    """The classes a run's labels index: `given` (extract --classes, in .cls index order), else the cache's own,
    else cat, dog. Names are lower-cased as class folders are. A cache's classes are fixed by its first labeled
    input (plan.onto_cache_classes says why): --classes that differ from them are refused, not merged."""
    if given is None:
        return tuple(have) or CLASSES
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


def extract_shards(spec: str | os.PathLike[str] | list[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
                   progress: Progress | None = None, strict: bool = False, model: torch.nn.Module | None = None,
                   classes: Sequence[str] | None = None) -> ExtractReport:
    """`extract` for tar shards: every shard the input names that the cache has not read as it is now. `classes`:
    what a `.cls` index or a key's class folder names (tar_classes)."""
    t0 = time.perf_counter()
    cfg.check()
    shards = [s if is_url(s) else os.path.abspath(s) for s in spec] if isinstance(spec, list) else \
        resolve_inputs(spec)
    spelled = Path(cache)
    cache = spelled.resolve()
    prov = cfg.provenance()
    report = ExtractReport(cache=spelled, found=0, layout="webdataset")
    dist = from_env(cfg.device)
    with _lock_once(cache, dist):
        had_cache = cache.exists()
        todo, idents, held, have = _plan(shards, cache, prov, report)
        names = tar_classes(classes, have, cache)
        if dist:
            dist.barrier()
        mine = dist.shard(todo) if dist else todo  # whole shards per rank
        tag = f"-r{dist.rank:04d}" if dist else ""
        results: list[ShardResult] = []
        track = {k for k, i in enumerate(mine) if shards[i] in held}
        try:
            if mine:
                results = extract_shard_list([shards[i] for i in mine], [idents[i] for i in mine], cache, cfg,
                                             progress, model, track=track, tag=tag, classes=names)
        except RuntimeError as e:  # a loader worker killed (OOM killer, crashing decoder)
            raise CatdogError(f"extraction stopped ({str(e).splitlines()[0]}); the shards finished so far are saved: "
                              "run extract again to resume, with --workers 0 to isolate a bad shard") from None
        except KeyboardInterrupt:
            if not dist:
                # index only; a shard whose done marker was written before the Ctrl-C is finished, not partial
                partial = {shards[i]: not matching_marker(cache, shards[i], idents[i], prov) for i in todo}
                finish(cache, prov, versions(), incomplete=partial)
            raise Interrupted(f"interrupted: finished shards saved to {cache}; run extract again to resume") from None
        mine_out = [outcome(r, held) for r in results]
        everyone = dist.gather(mine_out) if dist else [mine_out]
        drop = tally(report, [x for part in everyone for x in part])
        error: CatdogError | None = None
        if dist is None or dist.main:
            try:
                report.rows = _finish(cache, prov, report, [shards[i] for i in todo], drop, strict, had_cache,
                                      spec if not isinstance(spec, list) else "the shards", {s: False for s in shards},
                                      name=failure_name) if (todo or cache.exists() or list_parts(cache)) else 0
            except CatdogError as e:
                error = e
        raise_shared(dist, error)
    if dist:
        dist.close()
    refuse_nothing_read(report, spec, len(shards))
    report.seconds = time.perf_counter() - t0
    return report


Outcome = tuple[str, int, list[tuple[str, str]], str, list[bytes]]  # source, rows, failures, error, stale keys


def outcome(r: ShardResult, held: dict[str, set[bytes]]) -> Outcome:
    """A shard's result as the driver (or rank 0) needs it; stale: keys the cache held that a redone shard lacks."""
    return r.source, r.rows, r.failed, r.error, sorted(held[r.source] - r.keys) if r.done and r.source in held else []


def tally(report: ExtractReport, outcomes: list[Outcome]) -> set[tuple[str, bytes]]:
    """Count every shard's outcome into the report; returns the (source, key) rows to drop."""
    drop: set[tuple[str, bytes]] = set()
    for source, rows, failed, error, stale in outcomes:
        report.extracted += rows
        report.failed += [(failure_name(source, encode_path(key)), reason) for key, reason in failed]
        report.failed += [(source, error)] if error else []
        drop |= {(source, p) for p in stale}
    report.found = report.extracted + report.reused + sum(len(o[2]) for o in outcomes)
    return drop


def failure_name(source: str, key: bytes) -> str:
    """A failure record as reports name it: `shard#key`, or the shard alone when it could not be read."""
    return f"{source}#{os.fsdecode(key)}" if key else source


def refuse_nothing_read(report: ExtractReport, spec: object, shards: int) -> None:
    """After the index is written: an input that gave no row is an error, into a new cache or an existing one (it
    holds no images: an empty tar, one of other files; or nothing could be read from it), and so is any of its
    `shards` that could not be read at all (the others' rows stay saved; a rerun retries only that shard)."""
    unread = [(source, reason) for source, reason in report.failed if reason.startswith(UNREADABLE)]
    if not (report.extracted or report.reused or report.reused_failed):
        if all(reason == NO_IMAGE for _, reason in report.failed):  # none at all, too
            raise InputError(no_rows(spec if not isinstance(spec, list) else "the shards", report.failed))
        if not report.rows:
            source, reason = report.failed[0]
            raise InputError(f"nothing could be read from {printable(str(spec))}; first failure: "
                             f"{printable(source)}: {printable(reason)}")
    if unread:
        source, reason = unread[0]
        raise InputError(f"{len(unread):,} of {plural(shards, 'shard')} could not be read, first {printable(source)}: "
                         f"{printable(reason.removeprefix(UNREADABLE + ': '))}; the other shards' rows are saved "
                         f"({plural(report.rows, 'row')} in {printable(str(report.cache))}): run extract again to "
                         "retry the unread ones")
