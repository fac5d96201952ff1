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
    Recorded,
    Refresh,
    Rows,
    encode_path,
    finish,
    list_parts,
    locked,
    merge_classes,
    read_index,
    recorded,
    remove_cache,
    write_part,
)
from .discover import Discovery, Sample, discover
from .distributed import Dist, from_env
from .errors import CacheBusy, CatdogError, InputError, Interrupted, ProvenanceMismatch
from .files import printable
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
from .preprocess import DECODERS, VIEWS, decoder_of
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
    import h5py
    import torchvision

    return {"catdog_cache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "h5py": h5py.__version__}


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
            only: set[str] | None = None, model: torch.nn.Module | None = None, checksum: bool = False
            ) -> ExtractReport:
    """Cache features for every image of a folder that the cache does not already hold with the same content.
    `only` restricts the run to these relative paths; `model` reuses an already built backbone. A path that is not a
    folder (a .tar, a brace pattern, a listing of shards, a URL) is read as WebDataset tar shards (tarextract.py).
    Known files are decided by their stat where it proves them unchanged (rerun.py), all by hashing with
    `checksum`."""
    t0 = time.perf_counter()
    cfg.check()
    if is_shard_input(data_dir):
        if prune or only is not None:
            raise InputError(f"--prune works on folders; {data_dir} names tar shards")
        from .tarextract import extract_shards

        return extract_shards(data_dir, cache, cfg, progress=progress, strict=strict, model=model)
    spelled = Path(cache)
    cache = spelled.resolve()  # a symlinked cache is updated where it points; one lock however it is spelled
    scan_ns = time.time_ns()  # before the walk: every stat it takes, and every read after it, is newer
    disc = inputs(data_dir, strict, only)
    prov = cfg.provenance()
    source = str(disc.root.resolve())
    report = ExtractReport(cache=spelled, found=len(disc.samples), skipped=disc.skipped, warnings=disc.warnings,
                           layout=disc.layout)
    dist = from_env(cfg.device)
    with _lock_once(cache, dist):
        had_cache = cache.exists()
        if dist:  # the earliest rank's scan start: older than every rank's walk
            scan_ns = min(dist.gather(scan_ns))
        plan = _plan(disc, source, cache, prov, report, prune, progress, dist, checksum, scan_ns)
        todo, drop = [disc.samples[i] for i in plan.todo], plan.drop
        if dist:
            dist.barrier()  # all ranks have planned (and cleared stale temp parts) before any writes a part
        if plan.refresh is not None and (dist is None or dist.main):  # a shard older than this run's rows
            write_part(cache, f"part-{scan_ns:020d}-{os.getpid()}-refresh", prov, source, Rows(refresh=plan.refresh),
                       versions(), plan.shape, cfg.weights.path, disc.classes, scan_ns)
        mine = dist.shard(plan.todo) if dist else plan.todo  # each rank a contiguous slice; parts are its resume units
        if mine:
            assert disc.stat is not None
            _extract_parts(disc.root, source, [disc.samples[i] for i in mine], cache, cfg, prov, report, progress,
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
        if dist:  # the outcome reaches every rank: the cache's index exists, or all fail with one message
            message = dist.gather(str(error) if error else "")[0]
            if message and error is None:
                error = InputError(message)
        if error:
            raise error
    if dist:
        dist.close()
    report.seconds = time.perf_counter() - t0
    return report


def inputs(data_dir: str | os.PathLike[str], strict: bool, only: set[str] | None = None) -> Discovery:
    """The folder's samples (restricted to `only`), refused when there are none or --strict meets a skip."""
    disc = discover(data_dir)
    if only is not None:
        disc.keep(only)
    if not disc.samples:
        raise InputError(f"no images found in {data_dir}" + (f" ({len(disc.skipped)} files skipped)"
                                                              if disc.skipped else "") + disc.subfolder_hint())
    if strict and disc.skipped:
        rel, reason = disc.skipped[0]
        raise InputError(f"--strict: {len(disc.skipped)} files skipped, first {rel!r}: {reason}")
    return disc


def _finish(cache: Path, prov: Provenance, report: ExtractReport, todo: list[Sample], drop: set[tuple[str, bytes]],
            strict: bool, had_cache: bool, data_dir: str | os.PathLike[str], finished: dict[str, bool],
            planned: Index | None = None) -> int:
    """List the run's shards in the cache's index (or refuse under --strict); returns the cache's row count."""
    if strict:  # refuse to add them; the shards stay unlisted (they may hold an earlier run's saved work)
        failed = report.failed + [f for f in report.failed_before if f not in report.failed]
        failed += [(os.fsdecode(p), reason) for part in list_parts(cache)
                   for _, p, _, reason in read_index(part).failed if (os.fsdecode(p), reason) not in failed]
        if failed:
            rel, reason = failed[0]
            raise InputError(f"--strict: {len(failed)} files could not be decoded, first {rel!r}: {reason}; "
                             "nothing was added to the cache")
    if not (todo or drop or list_parts(cache)):
        index = planned or read_index(cache)
        if not set(index.incomplete) & set(finished):
            return index.shape[0]
    index = finish(cache, prov, versions(), drop, incomplete=finished)  # writes the index only: O(shards)
    if index.shape[0] == 0 and not had_cache:
        remove_cache(cache)
        raise InputError(f"no image in {data_dir} could be decoded; first failure: "
                         f"{report.failed[0][0]!r}: {report.failed[0][1]}")
    return index.shape[0]


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


@dataclass
class Known:
    """What the cache and its parts hold for one source folder, from their indexes alone (no image is read)."""

    files: Recorded = field(default_factory=lambda: recorded([], ""))  # path -> (sha256, trusted stat), this source
    reasons: dict[bytes, str] = field(default_factory=dict)  # path -> why an earlier run could not use it
    cached: set[bytes] = field(default_factory=set)  # rows of the cache itself (not its parts): what --prune drops
    recorded: set[bytes] = field(default_factory=set)  # rows and failure records anywhere, read or not
    class_lists: list[tuple[list[str], bool]] = field(default_factory=list)  # per index: (classes, has labels)
    cache: Index | None = None  # the cache's own index as read (a run with nothing to do reads it once)
    shape: tuple[int, ...] = ()  # the cache's [V, D] (a refresh shard's empty features match it)


def known_files(cache: Path, prov: Provenance, source: str) -> Known:
    """Read the cache's and its parts' indexes, refusing any made with another provenance. The one reading of what
    is known, for extract's plan (local and torchrun) and the Ray driver."""
    k = Known()
    indexes = []
    for path in ([cache] if cache.exists() else []) + list_parts(cache):
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
        rows = set(idx.paths) if idx.sources == [source] else \
            {p for s, p in zip(idx.source.tolist(), idx.paths, strict=True) if idx.sources[s] == source}
        k.cached |= rows if path == cache else set()
        k.reasons = {p: why for p, why in k.reasons.items() if p not in rows}  # a later part holds it as a row: fixed
        k.reasons |= {p: why for s, p, sha, why in idx.failed if idx.sources[s] == source and sha and p not in rows}
        k.recorded |= rows | {p for s, p, _, _ in idx.failed if idx.sources[s] == source}
    k.files = recorded(indexes, source)
    return k


def removals(k: Known, disc: Discovery, source: str, prune: bool, report: ExtractReport,
             keys: list[bytes] | None = None) -> set[tuple[str, bytes]]:
    """Files the cache holds that the folder no longer has: reported, and dropped under --prune."""
    keys = keys if keys is not None else [encode_path(s.rel) for s in disc.samples]
    report.removed = sorted(os.fsdecode(p) for p in k.cached.difference(keys))
    report.pruned = prune and bool(report.removed)
    return {(source, encode_path(r)) for r in report.removed} if prune else set()


@dataclass
class Plan:
    todo: list[int]  # indices into disc.samples: new or changed files
    drop: set[tuple[str, bytes]]  # deleted files' keys (with --prune)
    refresh: Refresh | None = None  # known files found unchanged by hashing, with the stat this run saw
    shape: tuple[int, ...] = ()  # the cache's [V, D]: a refresh shard's (empty) features match it
    cache: Index | None = None  # the cache's index as planned (a run with nothing to do reads it once)


def _plan(disc: Discovery, source: str, cache: Path, prov: Provenance, report: ExtractReport, prune: bool,
          progress: Progress | None, dist: Dist | None = None, checksum: bool = False, scan_ns: int = 0) -> Plan:
    """What this run must extract (new or changed files) and drop (deleted files, with --prune). Known files are
    unchanged when their stat says so, else when their hash does (rerun.py). Under torchrun each rank decides a
    slice of the already-known files (by its own walk's stats) and the ranks share the verdicts."""
    k = known_files(cache, prov, source)
    onto_cache_classes(disc, merge_classes(k.class_lists, str(cache)), cache)
    keys = [encode_path(s.rel) for s in disc.samples]
    candidates = [i for i, key in enumerate(keys) if key in k.files]
    found = verdicts(disc, k.files, dist.shard(candidates) if dist else candidates, scan_ns, checksum, progress, keys)
    if dist:
        shared = dist.gather((found.unchanged, found.refresh, found.hashed))
        found = Verdicts(set().union(*(u for u, _, _ in shared)), {i: st for _, r, _ in shared for i, st in r.items()},
                         sum(h for _, _, h in shared))
    plan = Plan([i for i in range(len(disc.samples)) if i not in found.unchanged], set(), cache=k.cache)
    report.reused = len(disc.samples) - len(plan.todo)
    report.hashed = found.hashed
    report.failed_before = failed_before(k, disc, found.unchanged, keys)
    plan.drop = removals(k, disc, source, prune, report, keys)
    if found.refresh:
        plan.refresh = refresh_records(found, keys, k.files)
        plan.shape = k.shape
    return plan


def failed_before(k: Known, disc: Discovery, unchanged: set[int] | list[int], keys: list[bytes]
                  ) -> list[tuple[str, str]]:
    """Unchanged files an earlier run could not use; --strict must see these too: skipped as known, they are still
    unusable files of the folder."""
    if not k.reasons:
        return []
    return [(disc.samples[i].rel, k.reasons[keys[i]]) for i in sorted(unchanged) if keys[i] in k.reasons]


def refresh_records(found: Verdicts, keys: list[bytes], files: Recorded) -> Refresh:
    """Known files found unchanged by hashing, with the stat this run saw (rerun.py): a record of a shard."""
    done = sorted(found.refresh)
    paths = [keys[i] for i in done]
    return Refresh(np.zeros(len(paths), np.int64), paths, [files.sha256(p) for p in paths],
                   np.array([found.refresh[i] for i in done], np.int64).reshape(-1, 4))


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
    disc.samples = [Sample(s.rel, ids[s.label]) if s.label >= 0 else s for s in disc.samples]
    disc.classes = tuple(have)


def matching_flags(prov: Provenance) -> str:
    """The extract options that reproduce a cache's provenance (for the refusal message)."""
    kind, _, rest = prov.weights.partition(":")
    weights = {"imagenet": "--weights imagenet", "random": f"--weights random --seed {rest.partition('=')[2]}",
               "file": f"--weights FILE (the file with sha256 {rest.partition('=')[2][:12]}…)"}.get(kind, prov.weights)
    flags = [f"--backbone {prov.arch}", f"--layer {prov.layer}", weights, f"--views {prov.views}",
             f"--dtype {prov.dtype}", f"--precision {prov.precision}", f"--decoder {decoder_of(prov.transform)}"]
    return " ".join(flags)


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
        raise CatdogError(f"extraction stopped after {report.extracted} images ({str(e).splitlines()[0]}); the work "
                          "so far is saved: run extract again to resume, with --workers 0 to isolate a bad file") \
            from None
    except KeyboardInterrupt:
        if not tag:  # under torchrun the next run lists the shards; ranks must not write the index concurrently
            finish(cache, prov, versions(), incomplete={source: True})  # `info` and `fit` say it is partial
        raise Interrupted(f"interrupted: {report.extracted} images saved to {cache}; run extract again to resume") \
            from None


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
