"""extract --engine ray over WebDataset tars: one Ray task per tar, on ray_pool's actor pool.

A tar is already the unit of work, retry and resume (tar_units.py: its cache shards, then its done marker), so the
driver plans exactly as the local engine does (plan.plan_tars: provenance, markers, the cache's classes), hands each
unfinished tar to an actor holding the backbone, and finishes the index from the markers with extract/finish.py. A
retried tar writes shards of its own (a fresh run id per attempt); rows a killed attempt saved are superseded by the
retry's (later shards win), never read twice. The tars are read where they are (local paths the workers share, or
fsspec URLs); the cache on a file system every node shares, or in a store (each worker uploads its own shards and
markers, store/worker.py; the driver takes them in before it writes the index)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cache import Provenance, list_parts, require_same
from ..errors import CatdogError
from ..extract.config import ExtractConfig, Progress
from ..extract.finish import finish_interrupted, finish_run, lock_once, unlisted_warning
from ..extract.folder_units import maybe_die
from ..extract.markers import markers_dir, matching_tar_marker
from ..extract.plan import plan_tars, tar_classes
from ..extract.tar_units import TarResult, extract_tar_list
from ..extract.tars import failure_name, outcome, refuse_nothing_read, tally, unfinished
from ..sources.spec import Identity, resolve_inputs
from ..store.staging import stage_of
from ..store.url import StoreURL
from ..store.worker import WorkerStore
from .ray_pool import KILL_HOOK, RayReport, connect, disconnect, require_ray, resources_for, schedule


class TarActor:
    """A Ray actor's state: the backbone, built once per actor process (again after a restart)."""

    def __init__(self, cfg: ExtractConfig, prov: Provenance, cache: str, workers: int, threads: int,
                 classes: tuple[str, ...], kill_hook: str, store: StoreURL | None = None) -> None:
        os.environ.setdefault("CATDOG_EXTRACT_THREADS", str(threads))  # this actor's CPUs, not the whole node's
        self.cfg = dataclasses.replace(cfg, workers=workers)
        # a cache on object storage: tars write into this worker's own folder and are uploaded from here
        self.store = WorkerStore(store) if store is not None else None
        self.prov, self.classes, self.kill_hook = prov, classes, kill_hook
        self.cache = self.store.cache if self.store else Path(cache)
        self.model: torch.nn.Module | None = None

    def run(self, index: int, source: str, ident: Identity, track: bool) -> TarResult:
        if self.model is None:
            # this node's backbone must be the driver's (same weights file content, same plugin version)
            require_same(self.cfg.provenance(), self.prov, "this Ray worker's backbone", "the driver's")
            self.model = self.cfg.resolve().build(self.cfg.weights)

        def after_part() -> None:  # test hook: the first attempt dies between a part and the shard's marker
            maybe_die(self.kill_hook, index, "part")

        result = extract_tar_list([source], [ident], self.cache, self.cfg, model=self.model, track={0} if track
                                  else set(), tag=f"-ray{index}", classes=self.classes, after_part=after_part)[0]
        if self.store:
            self.store.upload()  # its shards, then its marker: the tar is done in the store
        return result


def extract_ray_tars(spec: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig, opts: Any,
                     progress: Progress | None = None, strict: bool = False,
                     classes: Sequence[str] | None = None, checksum: bool = False) -> Any:
    """`extract --engine ray` for tar shards: every shard the input names that the cache has not read as it is now,
    one task each; a rerun whose shards are all done starts no Ray."""

    t0 = time.perf_counter()
    shards = resolve_inputs(spec)
    spelled = Path(cache)
    cache = spelled.resolve()
    prov = cfg.provenance()
    report = RayReport(cache=spelled, found=0, layout="webdataset")
    with lock_once(cache, None):  # the driver holds the lock for the run; its tasks write parts and markers only
        report.warnings += unlisted_warning(cache)
        had_cache = cache.exists()
        todo, idents, held, have = plan_tars(shards, cache, prov, report, checksum)
        names = tar_classes(classes, have, cache)
        report.shards, report.shards_run = len(shards), len(todo)
        results: list[TarResult] = []
        if todo:
            try:
                results = _run(require_ray(), shards, todo, idents, held, cache, cfg, prov, names, opts, report,
                               progress)
            except KeyboardInterrupt:  # as the local engine: finished shards listed, the others marked incomplete
                raise finish_interrupted(cache, prov, unfinished(cache, prov, [shards[i] for i in todo],
                                                                 [idents[i] for i in todo]), "finished shards"
                                         ) from None
        # the markers, not the tasks' return values, say what is finished
        for r in results:
            if r.done and matching_tar_marker(cache, r.source, idents[shards.index(r.source)], prov) is None:
                raise CatdogError(f"tar shard {r.source} reported done but has no matching marker in "
                                  f"{markers_dir(cache)}; nothing was finished: run extract again")
        drop = tally(report, [outcome(r, held) for r in results])
        report.rows = finish_run(cache, prov, report, [shards[i] for i in todo], drop, strict, had_cache, str(spec),
                              {s: False for s in shards}, name=failure_name
                              ) if (todo or cache.exists() or list_parts(cache)) else 0
    refuse_nothing_read(report, spec, len(shards))
    report.seconds = time.perf_counter() - t0
    return report


def _run(ray: Any, shards: list[str], todo: list[int], idents: list[Identity], held: dict[str, set[bytes]],
         cache: Path, cfg: ExtractConfig, prov: Provenance, names: tuple[str, ...], opts: Any, report: RayReport,
         progress: Progress | None) -> list[TarResult]:
    """The shards `todo` (indexes into `shards`) on a pool of actors, one task each."""
    started = connect(ray, opts.address)
    stage = stage_of(cache)  # a cache on object storage: the workers upload their own shards
    try:
        per_gpu, n, workers, threads = resources_for(ray, cfg, opts, len(todo))
        actor = ray.remote(num_cpus=opts.cpus_per_actor, num_gpus=per_gpu, max_restarts=opts.max_retries,
                           max_task_retries=opts.max_retries)(TarActor)
        pool = [actor.remote(cfg, prov, str(cache), workers, threads, names, os.environ.get(KILL_HOOK, ""),
                             stage.share() if stage else None) for _ in range(n)]
        report.actors = n

        def call(a: Any, i: int) -> Any:
            return a.run.remote(i, shards[i], idents[i], shards[i] in held)

        return schedule(ray, pool, todo, call, lambda i: f"tar shard {shards[i]}", lambda i: 1, progress, "shards")
    finally:
        if started:  # first: Ray's own messages about the killed actors' tasks end with it (a Ctrl-C)
            disconnect(ray)
        if stage:  # what the workers uploaded, into the driver's copy: its markers say what is done
            stage.collect()
