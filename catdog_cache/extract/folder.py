"""Runner: discover -> decode/preprocess (loader workers) -> frozen backbone -> shards -> the cache's new index.

Per-file problems become failure records (path + reason), never a crashed run. Work is saved in parts every
`PART_ROWS` rows or `PART_SECONDS` seconds, so a kill loses at most one part and the next run resumes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..cache import (
    CAT_DOG,
    UNKNOWN_STAT,
    Provenance,
    Rows,
    encode_path,
    write_part,
)
from ..engines.torchrun import from_env
from ..errors import CatdogError, InputError
from ..files import plural
from ..sources.folder import Discovery, Sample, discover
from .config import PART_SECONDS, ExtractConfig, ExtractReport, Progress, versions
from .finish import finish_interrupted, finish_run, lock_once, raise_shared, unlisted_warning
from .forward import run_features
from .loader import (
    Batch,
    PartWriter,
)
from .plan import (
    plan_folder,
)


def extract_folder(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
                   progress: Progress | None = None, prune: bool = False, strict: bool = False,
                   only: set[str] | None = None, model: torch.nn.Module | None = None, checksum: bool = False
                   ) -> ExtractReport:
    """Cache features for every image of a folder that the cache does not already hold with the same content, in
    this process (or this torchrun rank's share). `only` restricts the run to these relative paths; `model` reuses an
    already built backbone. Known files are decided by their stat where it proves them unchanged (rerun.py), all by
    hashing with `checksum`."""
    t0 = time.perf_counter()
    cfg.check()
    spelled = Path(cache)
    cache = spelled.resolve()  # a symlinked cache is updated where it points; one lock however it is spelled
    scan_ns = time.time_ns()  # before the walk: every stat it takes, and every read after it, is newer
    disc = inputs(data_dir, strict, only)
    prov = cfg.provenance()
    source = str(disc.root.resolve())
    report = ExtractReport(cache=spelled, found=len(disc.rels), skipped=disc.skipped, warnings=disc.warnings,
                           layout=disc.layout)
    dist = from_env(cfg.device)
    with lock_once(cache, dist):
        report.warnings += unlisted_warning(cache)
        had_cache = cache.exists()
        if dist:  # the earliest rank's scan start: older than every rank's walk
            scan_ns = min(dist.gather(scan_ns))
        plan = plan_folder(disc, source, cache, prov, report, prune, progress, dist, checksum, scan_ns)
        todo, drop = disc.pick(plan.todo), plan.drop
        if dist:
            dist.barrier()  # all ranks have planned (and cleared stale temp parts) before any writes a part
        if plan.refresh is not None and (dist is None or dist.main):  # a shard older than this run's rows
            write_part(cache, f"part-{scan_ns:020d}-{os.getpid()}-refresh", prov, source, Rows(refresh=plan.refresh),
                       versions(), plan.shape, cfg.weights.path, disc.classes, scan_ns)
        mine = dist.share(plan.todo) if dist else plan.todo  # each rank a contiguous slice; parts are its resume units
        try:
            if mine:
                assert disc.stat is not None
                _extract_parts(disc.root, source, disc.pick(mine), cache, cfg, prov, report, progress,
                               model, tag=f"-r{dist.rank:04d}" if dist else "", classes=disc.classes,
                               stat=disc.stat[mine], scan_ns=scan_ns)
        except KeyboardInterrupt:  # every batch received is in a part by now: list them, mark the folder partial
            raise finish_interrupted(cache, prov, {source: True}, plural(report.extracted, "image"), dist) from None
        if dist:  # every rank's shards are on disk before rank 0 lists them in the index
            gathered = dist.gather((report.extracted, report.failed))
            if dist.main:
                report.extracted = sum(g[0] for g in gathered)
                report.failed = [f for g in gathered for f in g[1]]
        error: CatdogError | None = None
        if dist is None or dist.main:
            try:
                # a whole-folder run that got here finished its folder: clear an earlier Ctrl-C's "incomplete"
                report.rows = finish_run(cache, prov, report, todo, drop, strict, had_cache, data_dir,
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
              info: dict[str, str], classes: tuple[str, ...] | list[str] = CAT_DOG, scan_ns: int = 0) -> Path:
    """One crash-safe part (temp + rename) of the cache; `scan_ns`: when the walk that took rows.stat started."""
    # the feature size from the rows themselves; a part of failures only asks the backbone (a meta pass)
    dim = rows.features[0].shape[-1] if rows.features else cfg.resolve().dim
    return write_part(cache, name, prov, source, rows, info, (len(cfg.views), dim), cfg.weights.path, classes,
                      scan_ns)

