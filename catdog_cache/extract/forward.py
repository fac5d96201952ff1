"""The frozen backbone over the loader's batches: features [B, V, D] per batch with their indices, sha256s and
failure records. Stages overlap: decoding in loader workers, on a GPU pinned copies and a batch yielded one step
late, so the writer's work on one batch runs while the next is computed."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..backbone import Preset, resolve_device
from .config import ExtractConfig, Progress
from .heap import keep_freed_memory
from .loader import (
    Batch,
    Encoded,
    ImageFiles,
    collate,
    cores,
    default_workers,
    device_batch,
    extract_threads,
    forced_threads,
    worker_init,
)
from .pacing import Gate, Pacer, Setting

# The last CPU run's pacer in this process (what it measured and chose): the bench reports it.
last_pacer: list[Pacer] = []


def run_features(root: Path, rels: list[str], cfg: ExtractConfig, model: torch.nn.Module | None = None,
                 progress: Progress | None = None, preset: Preset | None = None) -> Iterator[Batch]:
    """Yield per batch: (item indices, features [B, V, D] float32, sha256s, failures (index, sha, reason)).
    With a model and a preset given (an exported scorer), no backbone plugin is consulted.

    Stages overlap: loader workers decode ahead (prefetch); on a GPU the batch arrives pinned, goes over with a
    non-blocking copy, and its features come back into pinned memory while the next batch is fetched and run, so a
    batch is yielded one step late. The caller's work on a batch (the writer) overlaps the same way."""
    cfg.check()
    build: torch.nn.Module | Callable[[], torch.nn.Module] | None = model
    if model is None or preset is None:
        backbone = cfg.resolve()
        build = model if model is not None else functools.partial(backbone.build, cfg.weights)
        preset = backbone.preset
    workers = cfg.workers if cfg.workers >= 0 else default_workers(len(rels), resolve_device(cfg.device).type == "cpu")
    dataset = ImageFiles(root, rels, cfg.views, preset, cfg.decoder)
    yield from run_dataset(dataset, len(rels), workers, cfg, build, preset, progress)


def run_dataset(dataset: torch.utils.data.Dataset, total: int, workers: int, cfg: ExtractConfig,
                model: torch.nn.Module | Callable[[], torch.nn.Module], preset: Preset,
                progress: Progress | None = None) -> Iterator[Batch]:
    """run_features on any dataset of ImageFiles' items (a map-style one, or tars.TarSamples); `total` for progress.
    `model` may be the function that builds it: called once the loader workers have started, so that they decode
    the first batches while the backbone is built (torchvision's or timm's import, the weights read)."""
    device = resolve_device(cfg.device)  # under torchrun, "cuda" is this rank's GPU (distributed.from_env)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    batch, ncores = cfg.batch_size or (128 if cuda else 16), cores()
    gate = Gate(workers, ncores) if device.type == "cpu" and workers else None  # workers off the forward's cores
    if device.type == "cpu":
        keep_freed_memory()  # before the workers fork: they inherit it
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=cuda,
        worker_init_fn=functools.partial(worker_init, gate=gate) if workers else None,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    pacer = Pacer(ncores, batch, workers, forced_threads()) if device.type == "cpu" else None
    last_pacer[:] = [pacer] if pacer else []
    streams = ThreadPoolExecutor(ncores - 1, "forward") if pacer and ncores > 1 else None  # threads start on use
    done, pending = 0, None
    threads = torch.get_num_threads()
    try:
        batches = iter(loader)  # the workers start, and decode while the model is built
        model = (model if isinstance(model, torch.nn.Module) else model()).to(device, memory_format=torch.channels_last)
        torch.set_num_threads(extract_threads(workers))  # after the build: a seeded random init as it always ran
        for x, idx, shas, failures in batches:
            s = pacer.next() if pacer else Setting(torch.get_num_threads(), 0)
            if s.threads != torch.get_num_threads():
                torch.set_num_threads(s.threads)
            t = time.perf_counter()
            with torch.inference_mode(), gate.forward(s.cores) if gate else contextlib.nullcontext():
                # not held across the yield: the caller's code runs in its own mode
                out, ready = _forward(x, idx, shas, failures, model, cfg, device, preset, autocast_dtype, s,
                                      streams)
            if pacer:
                pacer.decode_ms = gate.decode_ms() if gate else 0.0
                pacer.record(s, len(idx), time.perf_counter() - t)
            if pending is not None:
                done = yield from _emit(pending, done, total, progress)
            pending = (*out, ready)
        if pending is not None:
            yield from _emit(pending, done, total, progress)
    finally:
        if streams:
            streams.shutdown()
        torch.set_num_threads(threads)


def _forward(x: Any, idx: list[int], shas: list[str], failures: list[tuple[int, str, str]], model: torch.nn.Module,
             cfg: ExtractConfig, device: torch.device, preset: Preset, autocast_dtype: torch.dtype | None,
             s: Setting = Setting(0, 0), pool: ThreadPoolExecutor | None = None) -> tuple[
                 tuple[list[int], torch.Tensor, list[str], list[tuple[int, str, str]]], Any]:
    """One loader batch -> ((indices, features [B, V, D] on the host, sha256s, failures), a CUDA event or None).
    s: images per forward call (0: the whole batch), and how many calls run at once (streams, on `pool`)."""
    if isinstance(x, Encoded):
        x, idx, shas, late = device_batch(x, idx, shas, cfg.views, device, preset)
        failures = failures + late
    out, ready = torch.zeros((0, len(cfg.views), 0)), None
    if x is not None:
        b, v = x.shape[:2]
        # [B*V, 3, S, S]; already channels-last from the workers, so on a CPU this is no copy at all
        x = x.flatten(0, 1).to(device, non_blocking=True, memory_format=torch.channels_last)
        if s.streams > 1 and pool is not None and b > 1:
            # [B*V, ...] in `streams` runs of whole chunks, so every call sees the rows a single stream's would
            chunk = s.chunk or b
            share = -(-b // s.streams // chunk) * chunk * v
            runs = [pool.submit(_stream, model, x[i:i + share], s, v, autocast_dtype)
                    for i in range(share, len(x), share)]
            first = _calls(model, x[:share], s.chunk * v, device, autocast_dtype)
            y = torch.cat([first, *(r.result() for r in runs)])
        else:
            y = _calls(model, x, s.chunk * v, device, autocast_dtype)  # [B*V, D]
        out = y.float().reshape(b, v, -1)  # [B, V, D]
        if out.is_cuda:  # back into pinned memory without waiting; `ready` says when it has landed
            out = torch.empty(out.shape, pin_memory=True).copy_(out, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
    return (idx, out, shas, failures), ready


def _calls(model: torch.nn.Module, x: torch.Tensor, step: int, device: torch.device,
           autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """[N, 3, S, S] -> [N, D] in calls of `step` rows (0: one call)."""
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        step = step or len(x)
        return torch.cat([model(x[i:i + step]) for i in range(0, len(x), step)]) if step < len(x) else model(x)


def _stream(model: torch.nn.Module, x: torch.Tensor, s: Setting, v: int, autocast_dtype: torch.dtype | None
            ) -> torch.Tensor:
    """One stream's share on a pool thread: inference mode, autocast and the thread count are per thread."""
    torch.set_num_threads(s.threads)
    with torch.inference_mode():
        return _calls(model, x, s.chunk * v, torch.device("cpu"), autocast_dtype)


def _emit(pending: tuple[list[int], torch.Tensor, list[str], list[tuple[int, str, str]], Any], done: int,
          total: int, progress: Progress | None) -> Iterator[Batch]:
    idx, out, shas, failures, ready = pending
    if ready is not None:
        ready.synchronize()
    done += len(idx) + len(failures)
    if progress:
        progress("extract", done, total)
    yield idx, out.numpy(), shas, failures
    return done

