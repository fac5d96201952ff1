"""extract --engine ray: one Ray task per input shard, run by a pool of actors that each hold the backbone.

The driver plans as a one-process extract does (same provenance checks against the cache and its parts), cuts the
folder's sorted file list into input shards (shardwork), skips the shards whose done marker holds, and hands the
rest to actors: one actor per GPU share (`num_gpus`, fractional allowed) or per `cpus_per_actor` CPUs. An actor
whose process dies is restarted by Ray (its backbone rebuilt) and its call retried, up to `max_retries` times; a
retried shard writes a part of its own (shardwork.run_shard). When every shard is done the driver finishes the
cache with extract's own `_finish`: the parts, shards in the cache's shards folder, are listed in its index.
Tar shards (WebDataset input) are units of work as they are: one task per tar shard (raytars.py).
Nothing here imports Ray until a run asks for it; the Ray-free protocol is in shardwork."""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import Provenance, Recorded, encode_path, locked, merge_classes, require_same
from .errors import CatdogError, InputError, Interrupted
from .extract import (
    ExtractConfig,
    ExtractReport,
    Progress,
    _finish,
    inputs,
)
from .plan import known_files, onto_cache_classes, removals
from .precheck import RAY_MISSING
from .shardspec import is_shard_input
from .shardwork import (
    InputShard,
    ShardResult,
    folder_shards,
    markers_dir,
    read_marker,
    run_shard,
    shard_done,
    stale_markers,
)

KILL_HOOK = "CATDOG_RAY_KILL"  # test hook: "<shard index>:<stage>:<flag file>[,...]" (shardwork._maybe_die)


@dataclass(frozen=True)
class RayOptions:
    address: str = ""  # "": $RAY_ADDRESS if set, else a local Ray started for this run
    shard_size: int = 1000  # files per input shard: the unit of work, retry and resume
    actors: int = 0  # 0: as many as the cluster's GPUs (or CPUs) hold
    gpus_per_actor: float = 0.0  # 0: 1 when the cluster has GPUs (and --device is not cpu); may be fractional
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # actor restarts, and retries of the call it was running

    def check(self) -> None:
        if self.shard_size < 1:
            raise InputError(f"--shard-size must be at least 1 file, got {self.shard_size}")
        if self.actors < 0:
            raise InputError(f"--actors must be 0 (as many as the cluster holds) or more, got {self.actors}")
        if self.gpus_per_actor < 0 or self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise InputError(f"--gpus-per-actor must be a fraction of one GPU or a whole number, got "
                             f"{self.gpus_per_actor}")
        if self.cpus_per_actor <= 0:
            raise InputError(f"--cpus-per-actor must be more than 0, got {self.cpus_per_actor}")


@dataclass
class RayReport(ExtractReport):
    shards: int = 0  # input shards of the folder
    shards_run: int = 0  # of them, run by a task this time (the others were done already)
    actors: int = 0


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def extract_ray(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
                opts: RayOptions, progress: Progress | None = None, prune: bool = False,
                strict: bool = False, checksum: bool = False, classes: list[str] | None = None) -> RayReport:
    t0 = time.perf_counter()
    cfg.check()
    opts.check()
    if importlib.util.find_spec("ray") is None:  # imported only when a shard needs running (about a second)
        raise InputError(RAY_MISSING)
    if is_shard_input(data_dir):  # a tar shard is already a unit of work and resume: one task each
        from .raytars import extract_ray_tars

        return extract_ray_tars(data_dir, cache, cfg, opts, progress, strict, classes)
    if classes is not None:
        raise InputError(f"--classes names the classes of tar shards; {data_dir} is a folder, whose classes are its "
                         "sub-folders: leave --classes out")
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
            # absolute paths: a worker's current folder is not the driver's
            results = _run(require_ray(), todo, Path(source), cache, cfg, prov, source, known, opts, report, progress,
                           scan_ns, checksum)
            for r in sorted(results, key=lambda r: r.index):
                report.extracted += r.extracted
                report.reused += r.reused
                report.hashed += r.hashed
                report.failed += r.failed
                report.failed_before += r.failed_before
        # the markers, not the tasks' return values, say what is finished (with the sharded cache: the index is
        # written from them); a shard without its marker is never finished over
        missing = [s for s in todo if (read_marker(cache, s.name) or {}).get("identity") != s.identity]
        if missing:
            raise CatdogError(f"input shard {missing[0].index} reported done but has no marker in "
                              f"{markers_dir(cache)}; nothing was finished: run extract again")
        order = {x.rel: i for i, x in enumerate(disc.samples)}
        report.failed_before.sort(key=lambda f: order[f[0]])  # in the folder's order, as one process lists them
        report.rows = _finish(cache, prov, report, [x for s in todo for x in s.samples], drop, strict, had_cache,
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
        return run_shard(shard, self.root, self.cache, self.cfg, self.prov, self.source, self.run_id, known,
                         reasons, self.model, self.kill_hook, self.scan_ns, self.checksum)


def connect(ray: Any, address: str) -> bool:
    """Join the cluster named by `address` or $RAY_ADDRESS, else start a local Ray. True when this call connected
    (the caller disconnects at the end; a local Ray stops then), False when the process was already connected."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS", "")
        raise InputError(f"--ray-address {where or '(local)'}: cannot start or reach Ray "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return True


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

        return _schedule(ray, pool, shards, call, lambda s: f"input shard {s.index} (from {s.samples[0].rel!r})",
                         lambda s: len(s.samples), progress)
    finally:
        if started:
            ray.shutdown()


def resources_for(ray: Any, cfg: ExtractConfig, opts: RayOptions, tasks: int) -> tuple[float, int, int, int]:
    """(GPUs per actor, actors, decode workers per actor, torch threads per actor) for the cluster as it is."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0) if cfg.device != "cpu" else 0.0
    if cfg.device.startswith("cuda") and not gpus:
        raise InputError(f"--device {cfg.device}: the Ray cluster has no GPU; use --device auto or cpu")
    per_gpu = (opts.gpus_per_actor or 1.0) if gpus else 0.0
    fits = int(gpus / per_gpu) if gpus else int(resources.get("CPU", 1.0) / opts.cpus_per_actor)
    n = max(1, min(opts.actors or fits, tasks))
    # decode workers inside each actor: the CPUs it was given beyond the one that runs it
    workers = cfg.workers if cfg.workers >= 0 else max(0, int(opts.cpus_per_actor) - 1)
    return per_gpu, n, workers, max(1, int(opts.cpus_per_actor) - workers)


def _schedule(ray: Any, pool: list[Any], items: list[Any], call: Callable[[Any, Any], Any],
              describe: Callable[[Any], str], size: Callable[[Any], int], progress: Progress | None,
              stage: str = "extract") -> list[Any]:
    """Every item (an input shard) to the next free actor (`call(actor, item)` submits it), two in flight per actor
    (the next one waits in the actor's queue while one runs). An item that fails for good stops new submissions;
    the running ones finish (their work is saved). Progress (`stage`) counts `size(item)` per item done: images of
    a folder's input shards, or tar shards."""
    queue = collections.deque(items)
    running: dict[Any, tuple[Any, Any]] = {}
    results: list[Any] = []
    failure: str = ""
    total, done = sum(size(s) for s in items), 0

    def submit(a: Any) -> None:
        s = queue.popleft()
        running[call(a, s)] = (a, s)

    try:
        for _ in range(2):
            for a in pool:
                if queue:
                    submit(a)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            a, s = running.pop(ready[0])
            try:
                results.append(ray.get(ready[0]))
            except Exception as e:  # Ray wraps the task's error: its cause is the message
                failure = failure or f"{describe(s)} failed: {_cause(e)}"
                queue.clear()
                continue
            done += size(s)
            if progress:
                progress(stage, done, total)
            if queue:
                submit(a)
    except KeyboardInterrupt:  # the actors are killed below, their running shards with them (no marker: redone)
        raise Interrupted(f"interrupted: {len(results)} of {len(items)} input shards saved; run extract again to "
                          "resume (done shards are skipped)") from None
    finally:
        for a in pool:
            ray.kill(a)
    if failure:
        raise CatdogError(f"{failure}; the other shards are saved: run extract again to resume")
    return results


def _cause(e: BaseException) -> str:
    """One line: the task's own error (a CatdogError's message), or what Ray says happened to its process."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, CatdogError) and text else f"{type(e).__name__}: {text[-1] if text else ''}"
