"""What both Ray drivers share: RayOptions and the report, joining or starting Ray, sizing the actor pool to the
cluster (GPU shares or CPUs per actor), and schedule(): every unit to the next free actor, failures turned into one
line, a Ctrl-C passed on to the driver so it finishes as every engine does. Also the default unit size
(auto_shard_size: every actor gets work) and a quiet Ray (its start-up warnings and colour codes kept out of the
command's output, a terminal's or a log file's)."""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import RAY_MISSING, CatdogError, InputError
from ..extract.config import ExtractConfig, ExtractReport, Progress
from ..machine import affinity_cores

KILL_HOOK = "CATDOG_RAY_KILL"  # test hook: "<shard index>:<stage>:<flag file>[,...]" (folder_units.maybe_die)
# --shard-size left out: about UNITS_PER_ACTOR units per actor (the last ones then finish close together), within
# these bounds: a unit is a task, a cache shard and a marker (too small: those costs dominate, batches run part
# full); a large one costs more when it is retried
UNITS_PER_ACTOR, MIN_AUTO_SHARD, MAX_AUTO_SHARD = 4, 32, 1000
# Ray's own loggers whose start-up lines say nothing about this run: "Token authentication is enabled for this Ray
# cluster..." at every local start
QUIET_LOGGERS = ("ray._private.authentication",)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes Ray puts in its errors' text


@dataclass(frozen=True)
class RayOptions:
    address: str = ""  # "": $RAY_ADDRESS if set, else a local Ray started for this run
    shard_size: int | None = None  # files per input shard: the unit of work, retry and resume; None: auto
    actors: int = 0  # 0: as many as the cluster's GPUs (or CPUs) hold
    gpus_per_actor: float = 0.0  # 0: 1 when the cluster has GPUs (and --device is not cpu); may be fractional
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # actor restarts, and retries of the call it was running

    def check(self) -> None:
        if self.shard_size is not None and self.shard_size < 1:
            raise InputError(f"--shard-size must be at least 1 file (left out: chosen from the files and actors), "
                             f"got {self.shard_size}")
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
    shard_size: int = 0  # files per input shard this run (--shard-size, or auto_shard_size's); 0 for tar shards


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def connect(ray: Any, address: str) -> bool:
    """Join the cluster named by `address` or $RAY_ADDRESS, else start a local Ray. True when this call connected
    (the caller disconnects at the end; a local Ray stops then), False when the process was already connected."""
    if ray.is_initialized():
        return False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_errors(ray, True)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        _quiet_errors(ray, False)
        where = address or os.environ.get("RAY_ADDRESS", "")
        raise InputError(f"--ray-address {where or '(local)'}: cannot start or reach Ray "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return True


def disconnect(ray: Any) -> None:
    """Leave the cluster `connect` joined (a local Ray stops); Ray's error printing as it was."""
    ray.shutdown()
    _quiet_errors(ray, False)


_PRINT: dict[str, Any] = {}  # Ray's own error printer while `connect`'s session lasts


def _quiet_errors(ray: Any, quiet: bool) -> None:
    """Ray's driver prints its cluster's error messages to stdout from a thread, coloured, even without
    log_to_driver (at a Ctrl-C, one "(raylet) Task FolderActor.run failed... will be retried" line per killed
    actor's task); this run reports each failure in its own line, so they are dropped while it lasts. Ray keeps them
    in its session's log files."""
    module = getattr(getattr(ray, "_private", None), "worker", None)
    if module is None or not hasattr(module, "print_to_stdstream"):
        return  # another Ray version: its printing as it is
    if quiet:
        _PRINT.setdefault("print", module.print_to_stdstream)
        module.print_to_stdstream = lambda data, ignore_prefix=False: None
    elif "print" in _PRINT:
        module.print_to_stdstream = _PRINT.pop("print")


def _fits(gpus: float, cpus: float, cfg: ExtractConfig, opts: RayOptions) -> tuple[float, int]:
    """(GPUs per actor, actors the cluster holds) for a cluster of `gpus` and `cpus`."""
    gpus = gpus if cfg.device != "cpu" else 0.0
    per_gpu = (opts.gpus_per_actor or 1.0) if gpus else 0.0
    return per_gpu, max(1, int(gpus / per_gpu) if gpus else int(cpus / opts.cpus_per_actor))


def resources_for(ray: Any, cfg: ExtractConfig, opts: RayOptions, tasks: int) -> tuple[float, int, int, int]:
    """(GPUs per actor, actors, decode workers per actor, torch threads per actor) for the cluster as it is."""
    resources = ray.cluster_resources()
    if cfg.device.startswith("cuda") and not resources.get("GPU", 0.0):
        raise InputError(f"--device {cfg.device}: the Ray cluster has no GPU; use --device auto or cpu")
    per_gpu, fits = _fits(resources.get("GPU", 0.0), resources.get("CPU", 1.0), cfg, opts)
    n = max(1, min(opts.actors or fits, tasks))
    # decode workers inside each actor: the CPUs it was given beyond the one that runs it
    workers = cfg.workers if cfg.workers >= 0 else max(0, int(opts.cpus_per_actor) - 1)
    return per_gpu, n, workers, max(1, int(opts.cpus_per_actor) - workers)


def auto_shard_size(files: int, actors: int) -> int:
    """--shard-size left out: files per unit for `files` files on `actors` actors (UNITS_PER_ACTOR each, within
    MIN_AUTO_SHARD..MAX_AUTO_SHARD). It depends on the folder's file count, so a rerun of an unchanged folder on the
    same cluster cuts the same units (their markers hold: no task runs)."""
    return max(MIN_AUTO_SHARD, min(MAX_AUTO_SHARD, -(-files // (max(1, actors) * UNITS_PER_ACTOR))))


def expected_actors(cfg: ExtractConfig, opts: RayOptions) -> tuple[int, bool]:
    """(the actors a run will have, whether this call joined a cluster: the caller then disconnects), known before
    any unit is cut: --actors; else what the cluster holds: the one this process has joined, one named by
    --ray-address or $RAY_ADDRESS (joined now), or the local Ray `connect` would start (this machine's CPUs, or its
    GPUs), which is not started for it (a rerun with every unit done starts no Ray)."""
    if opts.actors:
        return opts.actors, False
    running = sys.modules.get("ray")
    if (running is not None and running.is_initialized()) or opts.address or os.environ.get("RAY_ADDRESS"):
        ray = require_ray()
        joined = connect(ray, opts.address)
        return resources_for(ray, cfg, opts, 2**31)[1], joined
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return _fits(float(gpus), float(affinity_cores()), cfg, opts)[1], False


def schedule(ray: Any, pool: list[Any], items: list[Any], call: Callable[[Any, Any], Any],
              describe: Callable[[Any], str], size: Callable[[Any], int], progress: Progress | None,
              stage: str = "extract") -> list[Any]:
    """Every item (an input shard) to the next free actor (`call(actor, item)` submits it), two in flight per actor
    (the next one waits in the actor's queue while one runs). An item that fails for good stops new submissions;
    the running ones finish (their work is saved). Progress (`stage`) counts `size(item)` per item done: images of
    a folder's input shards, or tar shards. A KeyboardInterrupt kills the actors and goes on to the driver, which
    lists what is saved (extract.finish.finish_interrupted)."""
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
    finally:  # Ctrl-C too: the running units die with their actors (no marker: redone); the driver finishes the rest
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
    text = ANSI.sub("", str(e)).strip().splitlines()
    return text[0] if isinstance(e, CatdogError) and text else f"{type(e).__name__}: {text[-1] if text else ''}"

