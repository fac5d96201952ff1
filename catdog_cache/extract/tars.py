"""A whole tar input in this process (or this torchrun rank's share of its tars): plan by done markers, extract
the unfinished tars (tar_units), count every tar's outcome, finish the index; refusals for inputs that gave no row
or tars that could not be read."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..cache import (
    Provenance,
    encode_path,
    list_parts,
)
from ..engines.torchrun import from_env
from ..errors import CatdogError, InputError
from ..files import plural, printable
from ..sources.spec import Identity, is_url, resolve_inputs
from ..sources.tars import NO_IMAGE, UNREADABLE
from .config import ExtractConfig, ExtractReport, Progress
from .finish import finish_interrupted, finish_run, lock_once, no_rows, raise_shared, unlisted_warning
from .markers import matching_tar_marker
from .plan import plan_tars, tar_classes
from .tar_units import TarResult, extract_tar_list


def extract_tars(spec: str | os.PathLike[str] | list[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
                 progress: Progress | None = None, strict: bool = False, model: torch.nn.Module | None = None,
                 classes: Sequence[str] | None = None, checksum: bool = False) -> ExtractReport:
    """`extract` for tar shards: every shard the input names that the cache has not read as it is now (every shard
    with `checksum`: a tar's content is only known by reading it). `classes`: what a `.cls` index or a key's class
    folder names (tar_classes)."""
    t0 = time.perf_counter()
    cfg.check()
    shards = [s if is_url(s) else os.path.abspath(s) for s in spec] if isinstance(spec, list) else \
        resolve_inputs(spec)
    spelled = Path(cache)
    cache = spelled.resolve()
    prov = cfg.provenance()
    report = ExtractReport(cache=spelled, found=0, layout="webdataset")
    dist = from_env(cfg.device)
    with lock_once(cache, dist):
        report.warnings += unlisted_warning(cache)
        had_cache = cache.exists()
        todo, idents, held, have = plan_tars(shards, cache, prov, report, checksum)
        names = tar_classes(classes, have, cache)
        if dist:
            dist.barrier()
        mine = dist.share(todo) if dist else todo  # whole shards per rank
        tag = f"-r{dist.rank:04d}" if dist else ""
        results: list[TarResult] = []
        track = {k for k, i in enumerate(mine) if shards[i] in held}
        try:
            if mine:
                results = extract_tar_list([shards[i] for i in mine], [idents[i] for i in mine], cache, cfg,
                                             progress, model, track=track, tag=tag, classes=names)
        except RuntimeError as e:  # a loader worker killed (OOM killer, crashing decoder)
            raise CatdogError(f"extraction stopped ({str(e).splitlines()[0]}); the shards finished so far are saved: "
                              "run extract again to resume, with --workers 0 to isolate a bad shard") from None
        except KeyboardInterrupt:
            raise finish_interrupted(cache, prov, unfinished(cache, prov, [shards[i] for i in todo],
                                                             [idents[i] for i in todo]), "finished shards", dist
                                     ) from None
        mine_out = [outcome(r, held) for r in results]
        everyone = dist.gather(mine_out) if dist else [mine_out]
        drop = tally(report, [x for part in everyone for x in part])
        error: CatdogError | None = None
        if dist is None or dist.main:
            try:
                report.rows = finish_run(cache, prov, report, [shards[i] for i in todo], drop, strict, had_cache,
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


def unfinished(cache: Path, prov: Provenance, sources: list[str], idents: list[Identity]) -> dict[str, bool]:
    """After a Ctrl-C: each shard of this run, True (incomplete) unless its done marker was written before it."""
    return {s: not matching_tar_marker(cache, s, ident, prov) for s, ident in zip(sources, idents, strict=True)}


Outcome = tuple[str, int, list[tuple[str, str]], str, list[bytes]]  # source, rows, failures, error, stale keys


def outcome(r: TarResult, held: dict[str, set[bytes]]) -> Outcome:
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

