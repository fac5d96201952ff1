"""Runner: discover -> decode/preprocess (loader workers) -> frozen backbone -> shards -> the cache's new index.

Per-file problems become failure records (path + reason), never a crashed run. Work is saved in parts every
`PART_ROWS` rows or `PART_SECONDS` seconds, so a kill loses at most one part and the next run resumes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbone import DEFAULT_BACKBONE, Backbone, Preset, WeightsSpec, check_device, get_backbone, resolve_device
from .cache import (
    CLASS_MAP,
    UNKNOWN_STAT,
    Index,
    Provenance,
    Rows,
    encode_path,
    finish,
    list_parts,
    locked,
    read_index,
    remove_cache,
    write_part,
)
from .discover import Discovery, Sample, discover
from .distributed import Dist, from_env
from .errors import CacheBusy, CatdogError, InputError, Interrupted
from .files import plural, printable
from .pipeline import (
    Batch,
    Encoded,
    ImageFiles,
    PartWriter,
    collate,
    default_workers,
    device_batch,
    extract_threads,
    worker_init,
)
from .plan import (  # noqa: F401 (re-exported: the engines and tests import them from extract)
    Known,
    Plan,
    _plan,
    failed_before,
    known_files,
    matching_flags,
    onto_cache_classes,
    refresh_records,
    removals,
)
from .preprocess import DECODERS, VIEWS
from .rerun import Verdicts, same_content, sha256_file, verdicts  # noqa: F401 (same_content, sha256_file: old home)
from .shardspec import is_shard_input

PART_ROWS = 1024
PART_SECONDS = 120.0
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class ExtractConfig:
    weights: WeightsSpec
    backbone: str = DEFAULT_BACKBONE
    layer: str = ""  # "": the backbone's default (VGG16: fc7)
    device: str = "auto"
    batch_size: int = 0  # 0: auto, 16 on CPU (fastest measured on 2 cores), 128 on a GPU
    workers: int = -1  # -1: sized to the cores
    dtype: str = "float32"
    precision: str = "fp32"
    views: tuple[str, ...] = ("center",)
    decoder: str = "pil"
    part_rows: int = PART_ROWS  # rows per crash-safe part; not part of provenance

    def resolve(self) -> Backbone:
        return get_backbone(self.backbone, self.layer or None)

    def provenance(self) -> Provenance:
        bb = self.resolve()
        return Provenance(arch=bb.name, layer=bb.layer, weights=bb.identity(self.weights),
                          transform=bb.preset.spec(self.decoder),
                          views=",".join(self.views), dtype=self.dtype, precision=self.precision)

    def check(self) -> None:
        """Every option value, checked before any work (also when there is nothing to extract)."""
        check_device(self.device)
        if self.workers < -1:
            raise InputError(f"--workers must be -1 (auto), 0 (in process) or more, got {self.workers}")
        if self.batch_size < 0:
            raise InputError(f"--batch-size must be at least 1 (or 0 for auto), got {self.batch_size}")
        if self.dtype not in ("float32", "float16"):
            raise InputError(f"--dtype: expected float32 or float16, got {self.dtype!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"--precision: expected fp32, bf16 or fp16, got {self.precision!r}")
        if self.decoder not in DECODERS:
            raise InputError(f"--decoder: expected {' or '.join(DECODERS)}, got {self.decoder!r}")
        bad = [v for v in self.views if v not in VIEWS]
        if bad or not self.views:
            raise InputError(f"--views: expected a comma-separated subset of {', '.join(VIEWS)}, got {bad}")


def versions() -> dict[str, str]:
    """Recorded in every shard. torchvision's from its installed metadata: importing it pulls in torch._dynamo
    (4.5 s on this VM), which a rerun writing only a refresh shard would otherwise pay for a version string."""
    from importlib.metadata import PackageNotFoundError, version

    import h5py

    try:
        vision = version("torchvision")
    except PackageNotFoundError:
        vision = "unknown"
    return {"catdog_cache": __version__, "torch": torch.__version__, "torchvision": vision, "h5py": h5py.__version__}


def run_features(root: Path, rels: list[str], cfg: ExtractConfig, model: torch.nn.Module | None = None,
                 progress: Progress | None = None, preset: Preset | None = None) -> Iterator[Batch]:
    """Yield per batch: (item indices, features [B, V, D] float32, sha256s, failures (index, sha, reason)).
    With a model and a preset given (an exported scorer), no backbone plugin is consulted.

    Stages overlap: loader workers decode ahead (prefetch); on a GPU the batch arrives pinned, goes over with a
    non-blocking copy, and its features come back into pinned memory while the next batch is fetched and run, so a
    batch is yielded one step late. The caller's work on a batch (the writer) overlaps the same way."""
    cfg.check()
    if model is None or preset is None:
        backbone = cfg.resolve()
        model = model if model is not None else backbone.build(cfg.weights)
        preset = backbone.preset
    workers = cfg.workers if cfg.workers >= 0 else default_workers(len(rels))
    dataset = ImageFiles(root, rels, cfg.views, preset, cfg.decoder)
    yield from run_dataset(dataset, len(rels), workers, cfg, model, preset, progress)


def run_dataset(dataset: torch.utils.data.Dataset, total: int, workers: int, cfg: ExtractConfig,
                model: torch.nn.Module, preset: Preset, progress: Progress | None = None) -> Iterator[Batch]:
    """run_features on any dataset of ImageFiles' items (a map-style one, or tars.TarShards); `total` for progress."""
    device = resolve_device(cfg.device)  # under torchrun, "cuda" is this rank's GPU (distributed.from_env)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size or (128 if cuda else 16), shuffle=False, num_workers=workers,
        collate_fn=collate, pin_memory=cuda, worker_init_fn=worker_init if workers else None,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    done, pending = 0, None
    threads = torch.get_num_threads()
    torch.set_num_threads(extract_threads(workers))  # set before the workers fork: they start from 1 thread anyway
    try:
        for x, idx, shas, failures in loader:
            with torch.inference_mode():  # not held across the yield: the caller's code runs in its own mode
                out, ready = _forward(x, idx, shas, failures, model, cfg, device, preset, autocast_dtype)
            if pending is not None:
                done = yield from _emit(pending, done, total, progress)
            pending = (*out, ready)
        if pending is not None:
            yield from _emit(pending, done, total, progress)
    finally:
        torch.set_num_threads(threads)


def _forward(x: Any, idx: list[int], shas: list[str], failures: list[tuple[int, str, str]], model: torch.nn.Module,
             cfg: ExtractConfig, device: torch.device, preset: Preset, autocast_dtype: torch.dtype | None) -> tuple[
                 tuple[list[int], torch.Tensor, list[str], list[tuple[int, str, str]]], Any]:
    """One loader batch -> ((indices, features [B, V, D] on the host, sha256s, failures), a CUDA event or None)."""
    if isinstance(x, Encoded):
        x, idx, shas, late = device_batch(x, idx, shas, cfg.views, device, preset)
        failures = failures + late
    out, ready = torch.zeros((0, len(cfg.views), 0)), None
    if x is not None:
        b, v = x.shape[:2]
        # [B*V, 3, S, S]; already channels-last from the workers, so on a CPU this is no copy at all
        x = x.flatten(0, 1).to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            y = model(x)  # [B*V, D]
        out = y.float().reshape(b, v, -1)  # [B, V, D]
        if out.is_cuda:  # back into pinned memory without waiting; `ready` says when it has landed
            out = torch.empty(out.shape, pin_memory=True).copy_(out, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
    return (idx, out, shas, failures), ready


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


@dataclass
class ExtractReport:
    cache: Path
    found: int
    extracted: int = 0
    reused: int = 0
    reused_failed: int = 0  # tar shards skipped as done: the failure records their markers count
    hashed: int = 0  # known files read to decide whether they changed (the others were decided by their stat)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason) this run
    failed_before: list[tuple[str, str]] = field(default_factory=list)  # unchanged files an earlier run could not use
    skipped: list[tuple[str, str]] = field(default_factory=list)  # discovery skips
    removed: list[str] = field(default_factory=list)  # in the cache, no longer in the folder
    pruned: bool = False
    rows: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layout: str = ""


def extract(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
            progress: Progress | None = None, prune: bool = False, strict: bool = False,
            only: set[str] | None = None, model: torch.nn.Module | None = None, checksum: bool = False,
            classes: list[str] | None = None) -> ExtractReport:
    """Cache features for every image of a folder that the cache does not already hold with the same content.
    `only` restricts the run to these relative paths; `model` reuses an already built backbone. A path that is not a
    folder (a .tar, a brace pattern, a listing of shards, a URL) is read as WebDataset tar shards (tarextract.py).
    Known files are decided by their stat where it proves them unchanged (rerun.py), all by hashing with
    `checksum`. `classes` names the classes of tar shards' `.cls` indexes (a folder's are its class folders)."""
    t0 = time.perf_counter()
    cfg.check()
    if is_shard_input(data_dir):
        if prune or only is not None:
            raise InputError(f"--prune works on folders; {data_dir} names tar shards")
        from .tarextract import extract_shards

        return extract_shards(data_dir, cache, cfg, progress=progress, strict=strict, model=model, classes=classes)
    if classes is not None:
        raise InputError(f"--classes names the classes of tar shards; {data_dir} is a folder, whose classes are its "
                         "sub-folders: leave --classes out")
    spelled = Path(cache)
    cache = spelled.resolve()  # a symlinked cache is updated where it points; one lock however it is spelled
    scan_ns = time.time_ns()  # before the walk: every stat it takes, and every read after it, is newer
    disc = inputs(data_dir, strict, only)
    prov = cfg.provenance()
    source = str(disc.root.resolve())
    report = ExtractReport(cache=spelled, found=len(disc.rels), skipped=disc.skipped, warnings=disc.warnings,
                           layout=disc.layout)
    dist = from_env(cfg.device)
    with _lock_once(cache, dist):
        had_cache = cache.exists()
        if dist:  # the earliest rank's scan start: older than every rank's walk
            scan_ns = min(dist.gather(scan_ns))
        plan = _plan(disc, source, cache, prov, report, prune, progress, dist, checksum, scan_ns)
        todo, drop = disc.pick(plan.todo), plan.drop
        if dist:
            dist.barrier()  # all ranks have planned (and cleared stale temp parts) before any writes a part
        if plan.refresh is not None and (dist is None or dist.main):  # a shard older than this run's rows
            write_part(cache, f"part-{scan_ns:020d}-{os.getpid()}-refresh", prov, source, Rows(refresh=plan.refresh),
                       versions(), plan.shape, cfg.weights.path, disc.classes, scan_ns)
        mine = dist.shard(plan.todo) if dist else plan.todo  # each rank a contiguous slice; parts are its resume units
        if mine:
            assert disc.stat is not None
            _extract_parts(disc.root, source, disc.pick(mine), cache, cfg, prov, report, progress,
                           model, tag=f"-r{dist.rank:04d}" if dist else "", classes=disc.classes,
                           stat=disc.stat[mine], scan_ns=scan_ns)
        if dist:  # every rank's shards are on disk before rank 0 lists them in the index
            gathered = dist.gather((report.extracted, report.failed))
            if dist.main:
                report.extracted = sum(g[0] for g in gathered)
                report.failed = [f for g in gathered for f in g[1]]
        error: CatdogError | None = None
        if dist is None or dist.main:
            try:
                # a whole-folder run that got here finished its folder: clear an earlier Ctrl-C's "incomplete"
                report.rows = _finish(cache, prov, report, todo, drop, strict, had_cache, data_dir,
                                      {source: False} if only is None else {}, plan.cache)
            except CatdogError as e:
                error = e
        raise_shared(dist, error)
    if dist:
        dist.close()
    report.seconds = time.perf_counter() - t0
    return report


def inputs(data_dir: str | os.PathLike[str], strict: bool, only: set[str] | None = None) -> Discovery:
    """The folder's samples (restricted to `only`), refused when there are none or --strict meets a skip."""
    disc = discover(data_dir)
    if only is not None:
        disc.keep(only)
    if not disc.rels:
        raise InputError(f"no images found in {data_dir}" + (f" ({plural(len(disc.skipped), 'file')} skipped)"
                                                              if disc.skipped else "") + disc.subfolder_hint())
    if strict and disc.skipped:
        rel, reason = disc.skipped[0]
        raise InputError(f"--strict: {plural(len(disc.skipped), 'file')} skipped, first {rel!r}: {reason}")
    return disc


def _finish(cache: Path, prov: Provenance, report: ExtractReport, todo: list[Sample], drop: set[tuple[str, bytes]],
            strict: bool, had_cache: bool, data_dir: str | os.PathLike[str], finished: dict[str, bool],
            planned: Index | None = None, name: Callable[[str, bytes], str] = lambda source, p: os.fsdecode(p)
            ) -> int:
    """List the run's shards in the cache's index (or refuse under --strict); returns the cache's row count. `name`
    spells a part's failure record (source, path) as the report does, so --strict counts each failure once."""
    if strict:  # refuse to add them; the shards stay unlisted (they may hold an earlier run's saved work)
        failed = report.failed + [f for f in report.failed_before if f not in report.failed]
        seen = set(failed)
        for part in list_parts(cache):
            idx = read_index(part)
            for s, p, _, reason in idx.failed:
                record = (name(idx.sources[s], p), reason)
                if record not in seen:
                    seen.add(record)
                    failed.append(record)
        if failed:
            rel, reason = failed[0]
            raise InputError(f"--strict: {plural(len(failed), 'file')} could not be decoded, first {rel!r}: {reason}; "
                             "nothing was added to the cache")
    if not (todo or drop or list_parts(cache)):
        index = planned or read_index(cache)
        if not set(index.incomplete) & set(finished):
            return index.shape[0]
    index = finish(cache, prov, versions(), drop, incomplete=finished)  # writes the index only: O(shards)
    if index.shape[0] == 0 and not had_cache:
        remove_cache(cache)
        raise InputError(no_rows(data_dir, report.failed))
    return index.shape[0]


def no_rows(data_dir: str | os.PathLike[str], failed: list[tuple[str, str]]) -> str:
    """Why an input gave no row: none of its images decoded, or (tar shards, empty or of other files) it has none."""
    from .tars import NO_IMAGE, UNREADABLE

    if not failed or all(reason == NO_IMAGE for _, reason in failed):
        return f"no images in {printable(str(data_dir))}: it holds no .jpg/.jpeg/.png/.webp files" + (
            f" ({plural(len(failed), 'sample')} of other files, first {printable(failed[0][0])!r})" if failed else "")
    if all(reason.startswith(UNREADABLE) for _, reason in failed):
        return f"nothing could be read from {printable(str(data_dir))}; first failure: {printable(failed[0][0])}: " \
               f"{printable(failed[0][1])}"
    return f"no image in {data_dir} could be decoded; first failure: {failed[0][0]!r}: {failed[0][1]}"


def raise_shared(dist: Dist | None, error: CatdogError | None) -> None:
    """Rank 0's outcome reaches every rank (the cache's index exists, or all fail with one message), then raise."""
    if dist:
        message = dist.gather(str(error) if error else "")[0]
        if message and error is None:
            error = InputError(message)
    if error:
        raise error


@contextlib.contextmanager
def _lock_once(cache: Path, dist: Dist | None) -> Iterator[None]:
    """One lock per run: held by rank 0 under torchrun. A refusal reaches every rank, so none waits forever."""
    if dist is None:
        with locked(cache):
            yield
        return
    error: CatdogError | None = None
    with contextlib.ExitStack() as stack:
        if dist.main:
            try:
                stack.enter_context(locked(cache))
            except CatdogError as e:
                error = e
        messages = dist.gather(str(error) if error else "")
        if messages[0]:
            raise error if error else CacheBusy(messages[0])
        yield


def _extract_parts(root: Path, source: str, todo: list[Sample], cache: Path, cfg: ExtractConfig,
                   prov: Provenance, report: ExtractReport, progress: Progress | None,
                   model: torch.nn.Module | None = None, tag: str = "", classes: tuple[str, ...] = (),
                   stat: np.ndarray | None = None, scan_ns: int = 0) -> None:
    """Extract `todo` into shards; `stat` [len(todo), 4]: their stats as this run's walk (after `scan_ns`) saw them."""
    rels = [s.rel for s in todo]
    run_id = f"{time.time_ns():020d}-{os.getpid()}{tag}"
    n_parts = 0
    delay = float(os.environ.get("CATDOG_BATCH_DELAY", "0"))  # test hook: slow a run down to kill it midway
    info = versions()

    def write(batches: list[Batch]) -> None:  # on the writer thread: one part, built a batch at a time
        nonlocal n_parts
        save_part(cache, f"part-{run_id}-{n_parts:06d}", cfg, prov, source, rows_of(batches, todo, stat), info,
                  classes, scan_ns)
        n_parts += 1

    writer = PartWriter(write, cfg.part_rows, PART_SECONDS)
    try:
        try:
            for idx, feats, shas, failures in run_features(root, rels, cfg, model, progress):
                report.failed += [(rels[i], reason) for i, _, reason in failures]
                report.extracted += len(idx)
                writer.put((idx, feats, shas, failures))
                if delay:
                    time.sleep(delay)
        finally:
            writer.close()  # whatever ended the loop, every batch received is written (or the write's error raised)
    except RuntimeError as e:  # a loader worker killed (e.g. by the OOM killer or a crashing decoder)
        if e is writer.error:
            raise
        raise CatdogError(f"extraction stopped after {plural(report.extracted, 'image')} ({str(e).splitlines()[0]}); "
                          "the work so far is saved: run extract again to resume, with --workers 0 to isolate a bad "
                          "file") from None
    except KeyboardInterrupt:
        if not tag:  # under torchrun the next run lists the shards; ranks must not write the index concurrently
            finish(cache, prov, versions(), incomplete={source: True})  # `info` and `fit` say it is partial
        raise Interrupted(f"interrupted: {plural(report.extracted, 'image')} saved to {cache}; run extract again to "
                          "resume") from None


def rows_of(batches: Iterable[Batch], todo: list[Sample], stat: np.ndarray | None = None) -> Rows:
    """The rows (and failure records) of extracted batches; batch indices point into `todo`, and into `stat`
    [len(todo), 4] (the walk's stats of `todo`; None: unknown)."""
    rows = Rows()
    stats = stat.tolist() if stat is not None else [list(UNKNOWN_STAT)] * len(todo)
    for idx, feats, shas, failures in batches:
        rows.features += list(feats)  # [V, D] views of the batch's array; write_part stacks them once
        rows.paths += [encode_path(todo[i].rel) for i in idx]
        rows.labels += [todo[i].label for i in idx]
        rows.sha256 += shas
        rows.failed_paths += [encode_path(todo[i].rel) for i, _, _ in failures]
        rows.failed_sha256 += [sha for _, sha, _ in failures]
        rows.failed_reasons += [reason for _, _, reason in failures]
        rows.stat += [stats[i] for i in idx]
        rows.failed_stat += [stats[i] for i, _, _ in failures]
    return rows


def save_part(cache: Path, name: str, cfg: ExtractConfig, prov: Provenance, source: str, rows: Rows,
              info: dict[str, str], classes: tuple[str, ...] | list[str] = tuple(CLASS_MAP), scan_ns: int = 0) -> Path:
    """One crash-safe part (temp + rename) of the cache; `scan_ns`: when the walk that took rows.stat started."""
    # the feature size from the rows themselves; a part of failures only asks the backbone (a meta pass)
    dim = rows.features[0].shape[-1] if rows.features else cfg.resolve().dim
    return write_part(cache, name, prov, source, rows, info, (len(cfg.views), dim), cfg.weights.path, classes,
                      scan_ns)
