"""extract --engine ray over a folder: one Ray task per unit (a slice of the sorted file list), on an actor pool.

The driver plans as a one-process extract does (extract/plan.py: provenance checks against the cache, the cache's
classes), cuts the folder into units (folder_units.cut_folder), skips the units whose done marker holds, and hands the
rest to actors (ray_pool.py): one per GPU share (`num_gpus`, fractional allowed) or per `cpus_per_actor` CPUs. An actor
whose process dies is restarted by Ray (its backbone rebuilt) and its call retried, up to `max_retries` times; a
retried unit writes a cache shard of its own (folder_units.run_unit). When every unit is done the driver finishes the
cache with extract/finish.py: the units' shards are listed in the index. A cache in a store (`--cache s3://...`):
the driver works on its staging copy (store/staging.py), each worker writes its units into a folder of its own and
uploads them (store/worker.py), and the driver takes them in from the store before it writes the index. Nothing here
imports Ray until a run asks for it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import Provenance, Recorded, encode_path, merge_classes, require_same
from ..errors import CatdogError
from ..extract.config import ExtractConfig, Progress
from ..extract.finish import finish_interrupted, finish_run, lock_once, unlisted_warning
from ..extract.folder import inputs
from ..extract.folder_units import (
    FolderUnit,
    UnitResult,
    cut_folder,
    run_unit,
    unit_done,
)
from ..extract.markers import marked, markers_dir, stale_markers
from ..extract.plan import known_files, onto_cache_classes, removals
from ..store.staging import stage_of
from ..store.url import StoreURL
from ..store.worker import WorkerStore
from .ray_pool import (
    KILL_HOOK,
    RayOptions,
    RayReport,
    auto_shard_size,
    connect,
    disconnect,
    expected_actors,
    require_ray,
    resources_for,
    schedule,
)


def extract_ray_folder(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
                       opts: RayOptions, progress: Progress | None = None, prune: bool = False,
                       strict: bool = False, checksum: bool = False) -> RayReport:
    """A folder's sorted file list in units of `opts.shard_size` files (None: auto_shard_size for the folder and the
    actors), one Ray task each (folder_units.py)."""
    t0 = time.perf_counter()
    cfg.check()
    opts.check()
    spelled = Path(cache)
    cache = spelled.resolve()
    scan_ns = time.time_ns()  # before the walk (rerun.py's racy rule): the tasks record the walk's stats
    disc = inputs(data_dir, strict)
    prov = cfg.provenance()
    source = str(disc.root.resolve())
    report = RayReport(cache=spelled, found=len(disc.samples), skipped=disc.skipped, warnings=disc.warnings,
                       layout=disc.layout)
    # the driver holds the lock for the run; its tasks write parts and markers only
    with lock_once(cache, None), contextlib.ExitStack() as stack:
        report.warnings += unlisted_warning(cache)
        had_cache = cache.exists()
        known = known_files(cache, prov, source)
        onto_cache_classes(disc, merge_classes(known.class_lists, str(cache)), cache)  # as the local engine
        size = opts.shard_size
        if not size:  # every actor gets work: a few units each
            actors, joined = expected_actors(cfg, opts)
            if joined:  # a cluster joined to count its actors: left when the run ends
                stack.callback(disconnect, require_ray())
            size = auto_shard_size(len(disc.samples), actors)
        report.shard_size = size
        units = cut_folder(disc.root, disc.samples, source, prov, size, disc.classes, disc.stat)
        # --checksum: every unit runs, and its task hashes every known file
        todo = [s for s in units if checksum or not unit_done(cache, s, known)]
        report.shards, report.shards_run = len(units), len(todo)
        skip = {s.index for s in units} - {s.index for s in todo}
        for s in (s for s in units if s.index in skip):  # done: counted from the indexes, nothing read
            report.reused += len(s.samples)
            report.failed_before += [(x.rel, known.reasons[encode_path(x.rel)]) for x in s.samples
                                     if encode_path(x.rel) in known.reasons]
        drop = removals(known, disc, source, prune, report)
        if todo:
            try:  # absolute paths: a worker's current folder is not the driver's
                results = _run(require_ray(), todo, Path(source), cache, cfg, prov, source, known, opts, report,
                               progress, scan_ns, checksum)
            except KeyboardInterrupt:  # as the local engine: the done shards' parts listed, the folder marked partial
                done = len(units) - sum(not marked(cache, s.name, s.identity) for s in todo)
                raise finish_interrupted(cache, prov, {source: True}, f"{done} of {len(units)} units of the folder"
                                         ) from None
            for r in sorted(results, key=lambda r: r.index):
                report.extracted += r.extracted
                report.reused += r.reused
                report.hashed += r.hashed
                report.failed += r.failed
                report.failed_before += r.failed_before
        # the markers, not the tasks' return values, say what is finished (with the sharded cache: the index is
        # written from them); a unit without its marker is never finished over
        missing = [s for s in todo if not marked(cache, s.name, s.identity)]
        if missing:
            raise CatdogError(f"unit {missing[0].index} of the folder reported done but has no marker in "
                              f"{markers_dir(cache)}; nothing was finished: run extract again")
        order = {x.rel: i for i, x in enumerate(disc.samples)}
        report.failed_before.sort(key=lambda f: order[f[0]])  # in the folder's order, as one process lists them
        report.rows = finish_run(cache, prov, report, [x for s in todo for x in s.samples], drop, strict, had_cache,
                              data_dir, {source: False})
        prefix = units[0].name.rsplit("-", 1)[0]
        for stale in stale_markers(cache, prefix, {s.name for s in units}):
            stale.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - t0
    return report


class FolderActor:
    """A Ray actor's state: the backbone, built once per actor process (again after a restart)."""

    def __init__(self, cfg: ExtractConfig, prov: Provenance, root: str, cache: str, source: str, run_id: str,
                 workers: int, threads: int, kill_hook: str, scan_ns: int = 0, checksum: bool = False,
                 store: StoreURL | None = None) -> None:
        os.environ.setdefault("CATDOG_EXTRACT_THREADS", str(threads))  # this actor's CPUs, not the whole node's
        self.cfg = dataclasses.replace(cfg, workers=workers)
        # a cache on object storage: units write into this worker's own folder and are uploaded from here
        self.store = WorkerStore(store) if store is not None else None
        self.prov, self.root, self.source, self.run_id = prov, Path(root), source, run_id
        self.cache = self.store.cache if self.store else Path(cache)
        self.kill_hook, self.scan_ns, self.checksum = kill_hook, scan_ns, checksum
        self.model: torch.nn.Module | None = None

    def run(self, unit: FolderUnit, known: Recorded, reasons: dict[bytes, str]) -> UnitResult:
        if self.model is None:
            # this node's backbone must be the driver's (same weights file content, same plugin version)
            require_same(self.cfg.provenance(), self.prov, "this Ray worker's backbone", "the driver's")
            self.model = self.cfg.resolve().build(self.cfg.weights)
        delay = float(os.environ.get("CATDOG_BATCH_DELAY", "0"))  # test hook, as the tar runner's: a slower shard
        if delay:  # one delay per batch, as one process (batch size 0: auto, 16 on a CPU)
            time.sleep(delay * -(-len(unit.samples) // (self.cfg.batch_size or 16)))
        result = run_unit(unit, self.root, self.cache, self.cfg, self.prov, self.source, self.run_id, known,
                          reasons, self.model, self.kill_hook, self.scan_ns, self.checksum)
        if self.store:
            self.store.upload()  # its shard, then its marker: the unit is done in the store
        return result


def _run(ray: Any, units: list[FolderUnit], root: Path, cache: Path, cfg: ExtractConfig, prov: Provenance,
         source: str, known: Any, opts: RayOptions, report: RayReport, progress: Progress | None,
         scan_ns: int = 0, checksum: bool = False) -> list[UnitResult]:
    started = connect(ray, opts.address)
    stage = stage_of(cache)  # a cache on object storage: the workers upload their own shards
    try:
        per_gpu, n, workers, threads = resources_for(ray, cfg, opts, len(units))
        actor = ray.remote(num_cpus=opts.cpus_per_actor, num_gpus=per_gpu, max_restarts=opts.max_retries,
                           max_task_retries=opts.max_retries)(FolderActor)
        run_id = f"{time.time_ns():020d}-ray"
        pool = [actor.remote(cfg, prov, str(root), str(cache), source, run_id, workers, threads,
                             os.environ.get(KILL_HOOK, ""), scan_ns, checksum, stage.share() if stage else None)
                for _ in range(n)]
        report.actors = n

        def call(a: Any, s: FolderUnit) -> Any:
            keys = [encode_path(x.rel) for x in s.samples]
            mine = known.files.subset(keys)  # this unit's files only: what goes over the wire
            why = {k: known.reasons[k] for k in keys if k in known.reasons}
            return a.run.remote(s, mine, why)

        return schedule(ray, pool, units, call, lambda s: f"unit {s.index} of the folder (from {s.samples[0].rel!r})",
                         lambda s: len(s.samples), progress)
    finally:
        if started:  # first: Ray's own messages about the killed actors' tasks end with it (a Ctrl-C)
            disconnect(ray)
        if stage:  # what the workers uploaded, into the driver's copy: its markers say what is done
            stage.collect()

