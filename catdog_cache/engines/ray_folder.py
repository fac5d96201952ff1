"""extract --engine ray: one Ray task per input shard, run by a pool of actors that each hold the backbone.

The driver plans as a one-process extract does (same provenance checks against the cache and its parts), cuts the
folder's sorted file list into input shards (shardwork), skips the shards whose done marker holds, and hands the
rest to actors: one actor per GPU share (`num_gpus`, fractional allowed) or per `cpus_per_actor` CPUs. An actor
whose process dies is restarted by Ray (its backbone rebuilt) and its call retried, up to `max_retries` times; a
retried shard writes a part of its own (shardwork.run_shard). When every shard is done the driver finishes the
cache with extract's own `finish_run`: the parts, shards in the cache's shards folder, are listed in its index.
Tar shards (WebDataset input) are units of work as they are: one task per tar shard (raytars.py).
Nothing here imports Ray until a run asks for it; the Ray-free protocol is in shardwork."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import Provenance, Recorded, encode_path, locked, merge_classes, require_same
from ..errors import CatdogError
from ..extract.config import ExtractConfig, Progress
from ..extract.finish import finish_interrupted, finish_run
from ..extract.folder import inputs
from ..extract.folder_units import (
    InputShard,
    ShardResult,
    folder_shards,
    run_shard,
    shard_done,
)
from ..extract.markers import marked, markers_dir, stale_markers
from ..extract.plan import known_files, onto_cache_classes, removals
from .ray_pool import KILL_HOOK, RayOptions, RayReport, connect, require_ray, resources_for, schedule


def extract_ray_folder(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
                       opts: RayOptions, progress: Progress | None = None, prune: bool = False,
                       strict: bool = False, checksum: bool = False) -> RayReport:
    """A folder's sorted file list in units of `opts.shard_size` files, one Ray task each (folder_units.py)."""
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
    with locked(cache):  # the driver holds the lock for the run; its tasks write parts and markers only
        had_cache = cache.exists()
        known = known_files(cache, prov, source)
        onto_cache_classes(disc, merge_classes(known.class_lists, str(cache)), cache)  # as the local engine
        shards = folder_shards(disc.root, disc.samples, source, prov, opts.shard_size, disc.classes, disc.stat)
        # --checksum: every shard runs, and its task hashes every known file
        todo = [s for s in shards if checksum or not shard_done(cache, s, known)]
        report.shards, report.shards_run = len(shards), len(todo)
        skip = {s.index for s in shards} - {s.index for s in todo}
        for s in (s for s in shards if s.index in skip):  # done: counted from the indexes, nothing read
            report.reused += len(s.samples)
            report.failed_before += [(x.rel, known.reasons[encode_path(x.rel)]) for x in s.samples
                                     if encode_path(x.rel) in known.reasons]
        drop = removals(known, disc, source, prune, report)
        if todo:
            try:  # absolute paths: a worker's current folder is not the driver's
                results = _run(require_ray(), todo, Path(source), cache, cfg, prov, source, known, opts, report,
                               progress, scan_ns, checksum)
            except KeyboardInterrupt:  # as the local engine: the done shards' parts listed, the folder marked partial
                done = len(shards) - sum(not marked(cache, s.name, s.identity) for s in todo)
                raise finish_interrupted(cache, prov, {source: True}, f"{done} of {len(shards)} input shards"
                                         ) from None
            for r in sorted(results, key=lambda r: r.index):
                report.extracted += r.extracted
                report.reused += r.reused
                report.hashed += r.hashed
                report.failed += r.failed
                report.failed_before += r.failed_before
        # the markers, not the tasks' return values, say what is finished (with the sharded cache: the index is
        # written from them); a shard without its marker is never finished over
        missing = [s for s in todo if not marked(cache, s.name, s.identity)]
        if missing:
            raise CatdogError(f"input shard {missing[0].index} reported done but has no marker in "
                              f"{markers_dir(cache)}; nothing was finished: run extract again")
        order = {x.rel: i for i, x in enumerate(disc.samples)}
        report.failed_before.sort(key=lambda f: order[f[0]])  # in the folder's order, as one process lists them
        report.rows = finish_run(cache, prov, report, [x for s in todo for x in s.samples], drop, strict, had_cache,
                              data_dir, {source: False})
        prefix = shards[0].name.rsplit("-", 1)[0]
        for stale in stale_markers(cache, prefix, {s.name for s in shards}):
            stale.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - t0
    return report


class ShardExtractor:
    """A Ray actor's state: the backbone, built once per actor process (again after a restart)."""

    def __init__(self, cfg: ExtractConfig, prov: Provenance, root: str, cache: str, source: str, run_id: str,
                 workers: int, threads: int, kill_hook: str, scan_ns: int = 0, checksum: bool = False) -> None:
        os.environ.setdefault("CATDOG_EXTRACT_THREADS", str(threads))  # this actor's CPUs, not the whole node's
        self.cfg = dataclasses.replace(cfg, workers=workers)
        self.prov, self.root, self.cache, self.source, self.run_id = prov, Path(root), Path(cache), source, run_id
        self.kill_hook, self.scan_ns, self.checksum = kill_hook, scan_ns, checksum
        self.model: torch.nn.Module | None = None

    def run(self, shard: InputShard, known: Recorded, reasons: dict[bytes, str]) -> ShardResult:
        if self.model is None:
            # this node's backbone must be the driver's (same weights file content, same plugin version)
            require_same(self.cfg.provenance(), self.prov, "this Ray worker's backbone", "the driver's")
            self.model = self.cfg.resolve().build(self.cfg.weights)
        delay = float(os.environ.get("CATDOG_BATCH_DELAY", "0"))  # test hook, as the tar runner's: a slower shard
        time.sleep(delay * -(-len(shard.samples) // self.cfg.batch_size))  # one delay per batch, as one process
        return run_shard(shard, self.root, self.cache, self.cfg, self.prov, self.source, self.run_id, known,
                         reasons, self.model, self.kill_hook, self.scan_ns, self.checksum)


def _run(ray: Any, shards: list[InputShard], root: Path, cache: Path, cfg: ExtractConfig, prov: Provenance,
         source: str, known: Any, opts: RayOptions, report: RayReport, progress: Progress | None,
         scan_ns: int = 0, checksum: bool = False) -> list[ShardResult]:
    started = connect(ray, opts.address)
    try:
        per_gpu, n, workers, threads = resources_for(ray, cfg, opts, len(shards))
        actor = ray.remote(num_cpus=opts.cpus_per_actor, num_gpus=per_gpu, max_restarts=opts.max_retries,
                           max_task_retries=opts.max_retries)(ShardExtractor)
        run_id = f"{time.time_ns():020d}-ray"
        pool = [actor.remote(cfg, prov, str(root), str(cache), source, run_id, workers, threads,
                             os.environ.get(KILL_HOOK, ""), scan_ns, checksum) for _ in range(n)]
        report.actors = n

        def call(a: Any, s: InputShard) -> Any:
            keys = [encode_path(x.rel) for x in s.samples]
            mine = known.files.subset(keys)  # this shard's files only: what goes over the wire
            why = {k: known.reasons[k] for k in keys if k in known.reasons}
            return a.run.remote(s, mine, why)

        return schedule(ray, pool, shards, call, lambda s: f"input shard {s.index} (from {s.samples[0].rel!r})",
                         lambda s: len(s.samples), progress)
    finally:
        if started:
            ray.shutdown()

