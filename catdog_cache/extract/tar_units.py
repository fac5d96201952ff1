"""A tar's work: its samples streamed (sources/tars.py), decoded and run through the backbone, its rows written as
cache shards (one source per shard, every `part_rows` rows), then its done marker (extract/markers.py).

A row's source is its tar (absolute local path or URL) and its path the sample's key. A tar is the resume unit: when
its last shard is on disk, the marker records its identity (size + mtime_ns, or size + ETag/mtime for a URL, digested
with the provenance); a rerun skips a tar whose marker matches without opening it. A tar cut short by a kill has no
marker and is read again; its new rows supersede those saved before (later shards win), and when a changed tar is
redone, keys it no longer holds are dropped."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbone import Preset, resolve_device
from ..cache import (
    Provenance,
    Rows,
    encode_path,
    write_part,
)
from ..cache.format import CAT_DOG
from ..sources.spec import Identity
from ..sources.tars import End, TarSamples
from .config import PART_SECONDS, ExtractConfig, Progress, versions
from .forward import run_dataset
from .loader import Batch, PartWriter, default_workers
from .markers import FAILED, Marker, entries_digests, tar_identity, tar_unit, write_marker


@dataclass
class TarResult:
    """One shard's outcome in this run: rows and failure records written, and whether it is done (marked)."""

    source: str
    rows: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    done: bool = False
    error: str = ""  # the shard could not be read: retried by the next run
    keys: set[bytes] = field(default_factory=set)  # every key seen (kept only when asked: stale-key dropping)


class _TarRows:
    """Writer-thread state: batches routed into per-shard rows, a part written per shard every `part_rows` rows
    (a part holds one source), and a shard's marker written once its last part is on disk."""

    def __init__(self, sources: list[str], idents: list[Identity], cache: Path, cfg: ExtractConfig,
                 prov: Provenance, track: set[int], tag: str, classes: tuple[str, ...],
                 after_part: Callable[[], None] | None = None) -> None:
        self.sources, self.idents, self.cache, self.cfg, self.prov, self.track = sources, idents, cache, cfg, prov, \
            track
        self.classes = classes
        self.after_part = after_part  # a Ray actor's test hook: dies between a part and the shard's marker
        self.results = [TarResult(s) for s in sources]
        self.rows: dict[int, Rows] = {}
        # per shard, what its parts written so far hold (key -> (sha256, label)), as the cache will merge them: the
        # digest its marker records. A shard's rows only, while it is read: ~200 bytes a row
        self.held: dict[int, dict[bytes, tuple[str, int]]] = {}
        self.ends: dict[int, int] = {}
        self.run_id = f"{time.time_ns():020d}-{os.getpid()}{tag}"
        self.n_parts = 0
        self.info = versions()

    def _buffer(self, i: int, key: str) -> Rows:
        if i in self.track:
            self.results[i].keys.add(encode_path(key))
        return self.rows.setdefault(i, Rows())

    def write(self, batches: list[Batch]) -> None:
        for refs, feats, shas, failures in batches:
            for ref, row, sha in zip(refs, feats, shas, strict=True):
                rows = self._buffer(ref.shard, ref.key)
                rows.features.append(row)  # [V, D]
                rows.paths.append(encode_path(ref.key))
                rows.labels.append(ref.label)
                rows.sha256.append(sha)
                self.results[ref.shard].rows += 1
            for ref, sha, reason in failures:
                if isinstance(ref, End):
                    self._end(ref)
                    continue
                rows = self._buffer(ref.shard, ref.key)
                rows.failed_paths.append(encode_path(ref.key))
                rows.failed_sha256.append(sha)
                rows.failed_reasons.append(reason)
                self.results[ref.shard].failed.append((ref.key, reason))
        for i in [i for i, r in self.rows.items() if len(r) >= self.cfg.part_rows]:
            self._part(i)

    def _end(self, end: End) -> None:
        result = self.results[end.shard]
        if end.error and not result.error:
            result.error = end.error
            rows = self._buffer(end.shard, "")  # listed by `info --failures`; dropped once the shard is read
            rows.failed_paths.append(b"")
            rows.failed_sha256.append("")
            rows.failed_reasons.append(end.error)
        self.ends[end.shard] = self.ends.get(end.shard, 0) + 1
        if self.ends[end.shard] < end.readers:
            return
        self._part(end.shard)
        held = self.held.pop(end.shard, {})
        if not result.error:
            source = result.source
            write_marker(self.cache, Marker(tar_unit(source), tar_identity(source, self.idents[end.shard],
                                                                           self.prov.to_json()),
                                            result.rows, len(result.failed), "tar", source,
                                            digest=entries_digests(held)[0]))
            result.done = True

    def _part(self, i: int) -> None:
        rows = self.rows.pop(i, None)
        if not rows:
            return
        dim = rows.features[0].shape[-1] if rows.features else self.cfg.resolve().dim
        write_part(self.cache, f"part-{self.run_id}-{self.n_parts:06d}", self.prov, self.sources[i], rows, self.info,
                   (len(self.cfg.views), dim), self.cfg.weights.path, self.classes)
        self.n_parts += 1
        held = self.held.setdefault(i, {})  # as view.merge: a later part's entry wins, in one part a failure
        held.update(zip(rows.paths, zip(rows.sha256, rows.labels, strict=True), strict=True))
        held.update((p, (sha, FAILED)) for p, sha in zip(rows.failed_paths, rows.failed_sha256, strict=True))
        if self.after_part:
            self.after_part()

    def flush(self) -> None:
        """At the end of a run (the writer thread has stopped): parts for what unfinished shards read so far."""
        for i in list(self.rows):
            self._part(i)


def default_tar_workers(idents: list[Identity], device: str = "cpu") -> int:
    """As for folders (loader.default_workers: on a CPU one per core, behind the pacer's gate; feeding a GPU cores - 1),
    the image count estimated from the shards' bytes: at 16 KiB per image (small for a photo: the estimate errs
    towards workers), under 1 MiB in all decodes in process."""
    return default_workers(sum(max(x.size, 0) for x in idents) // (16 * 2**10), resolve_device(device).type == "cpu")


def extract_tar_list(sources: list[str], idents: list[Identity], cache: Path, cfg: ExtractConfig,
                       progress: Progress | None = None, model: torch.nn.Module | None = None,
                       preset: Preset | None = None, track: set[int] = frozenset(), tag: str = "",
                       classes: Sequence[str] = CAT_DOG, after_part: Callable[[], None] | None = None
                       ) -> list[TarResult]:
    """Read these shards (streamed, decoded in loader workers) into parts next to `cache`, and write the done
    marker of each shard read to its end. No lock, no index: the caller holds the cache's lock and lists the parts
    (extract_tars), or runs this as one task per shard and merges afterwards (e.g. a Ray engine). Rerunning a
    shard is harmless: its rows replace the earlier ones (later parts win), never duplicate them. Labels index
    `classes` (tar_classes: the cache's own when it has some)."""
    cfg.check()
    prov = cfg.provenance()
    build: torch.nn.Module | Callable[[], torch.nn.Module] | None = model
    if model is None or preset is None:
        backbone = cfg.resolve()
        build = model if model is not None else functools.partial(backbone.build, cfg.weights)  # once workers run
        preset = backbone.preset
    state = _TarRows(sources, idents, cache, cfg, prov, set(track), tag, tuple(classes), after_part)
    workers = cfg.workers if cfg.workers >= 0 else default_tar_workers(idents, cfg.device)
    delay = float(os.environ.get("CATDOG_BATCH_DELAY", "0"))  # test hook: slow a run down to kill it midway
    writer = PartWriter(state.write, cfg.part_rows, PART_SECONDS)
    ended: dict[int, int] = {}
    try:
        dataset = TarSamples(sources, cfg.views, preset, cfg.decoder, classes)
        for batch in run_dataset(dataset, 0, workers, cfg, build, preset):
            writer.put(batch)
            for ref, _, _ in batch[3]:
                if isinstance(ref, End):
                    ended[ref.shard] = ended.get(ref.shard, 0) + 1
                    if progress and ended[ref.shard] == ref.readers:
                        progress("shards", sum(ended[i] == ref.readers for i in ended), len(sources))
            if delay:
                time.sleep(delay)
    finally:
        writer.close()  # every batch received is written (or the write's error raised)
    state.flush()
    return state.results

