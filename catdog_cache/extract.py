"""Runner: discover -> decode/preprocess (loader workers) -> frozen backbone -> parts -> one assembled cache.

Per-file problems become failure records (path + reason), never a crashed run. Work is saved in parts every
`PART_ROWS` rows or `PART_SECONDS` seconds, so a kill loses at most one part and the next run resumes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbone import DEFAULT_BACKBONE, Backbone, Preset, WeightsSpec, check_device, get_backbone, resolve_device
from .cache import Provenance, Rows, assemble, encode_path, list_parts, locked, read_index, write_part
from .discover import Discovery, Sample, discover
from .distributed import Dist, from_env
from .errors import CacheBusy, CatdogError, InputError, Interrupted, ProvenanceMismatch
from .files import read_regular, sha256_regular
from .preprocess import (
    DECODERS,
    MAX_FILE_BYTES,
    VIEWS,
    DecodeError,
    decode_rgb,
    decoder_of,
    plain_jpeg,
    tensor_views,
    views_of,
)

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


def sha256_file(path: Path) -> str:
    return sha256_regular(path, MAX_FILE_BYTES)


class ImageFiles(torch.utils.data.Dataset):
    """Index -> (index, [V, 3, 224, 224] or None, sha256 of the bytes decoded, failure reason).

    With decoder="torchvision" the item is instead ("jpeg", raw bytes) for plain JPEGs, to be decoded in a batch on
    the extraction device, or ("rgb", [3, H, W] uint8) decoded by Pillow; `device_batch` finishes both."""

    def __init__(self, root: Path, rels: list[str], views: tuple[str, ...], preset: Preset, decoder: str = "pil"
                 ) -> None:
        self.root, self.rels, self.views, self.decoder = root, rels, views, decoder
        self.transform = preset.transform()

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str]:
        try:  # a regular file, opened non-blocking, read up to the limit: the file may have changed since discovery
            data = read_regular(self.root / self.rels[i], MAX_FILE_BYTES)
        except ValueError as e:
            return i, None, "", str(e)
        except OSError as e:
            return i, None, "", f"unreadable: {e.strerror or e}"
        sha = hashlib.sha256(data).hexdigest()
        try:
            if self.decoder == "torchvision":
                if plain_jpeg(data):
                    return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), sha, ""
                return i, ("rgb", torch.from_numpy(np.asarray(decode_rgb(data)).copy()).permute(2, 0, 1)), sha, ""
            return i, views_of(decode_rgb(data), self.views, self.transform), sha, ""
        except DecodeError as e:
            return i, None, sha, str(e)
        except Exception as e:  # a decoder bug on one file must not end a multi-hour run
            return i, None, sha, f"decode failed: {type(e).__name__}: {e}"


def _collate(batch: list[tuple[int, Any, str, str]]):
    good = [b for b in batch if b[1] is not None]
    if good and isinstance(good[0][1], tuple):  # decoder="torchvision": decoded later, on the device
        x: Any = [b[1] for b in good]
    else:
        x = torch.stack([b[1] for b in good]) if good else None  # [B, V, 3, 224, 224]
    return x, [b[0] for b in good], [b[2] for b in good], [(b[0], b[2], b[3]) for b in batch if b[1] is None]


def device_batch(items: list[tuple[str, torch.Tensor]], idx: list[int], shas: list[str],
                 views: tuple[str, ...], device: torch.device, preset: Preset
                 ) -> tuple[torch.Tensor | None, list[int], list[str], list[tuple[int, str, str]]]:
    """decoder="torchvision": decode the batch's JPEGs together on the device (nvJPEG on a GPU), then resize, crop
    and normalise there. A batch that fails to decode is retried image by image, so one bad file is one failure."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)

    jpegs = [k for k, (kind, _) in enumerate(items) if kind == "jpeg"]
    images: list[torch.Tensor | None] = [t if kind == "rgb" else None for kind, t in items]
    failed: list[tuple[int, str, str]] = []
    try:
        for k, img in zip(jpegs, decode([items[k][1] for k in jpegs]) if jpegs else [], strict=True):
            images[k] = img
    except RuntimeError:
        for k in jpegs:
            try:
                images[k] = decode([items[k][1]])[0]
            except RuntimeError as e:
                failed.append((idx[k], shas[k], f"corrupt or truncated JPEG: {str(e).splitlines()[0]}"))
    keep = [k for k, img in enumerate(images) if img is not None]
    x = tensor_views([images[k] for k in keep], views, device, preset) if keep else None  # [B, V, 3, S, S]
    return x, [idx[k] for k in keep], [shas[k] for k in keep], failed


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the main process owns the cores for the forward pass


def default_workers(n_items: int) -> int:
    return 0 if n_items < 64 else min(4, os.cpu_count() or 1)


def run_features(root: Path, rels: list[str], cfg: ExtractConfig, model: torch.nn.Module | None = None,
                 progress: Progress | None = None, preset: Preset | None = None
                 ) -> Iterator[tuple[list[int], np.ndarray, list[str], list[tuple[int, str, str]]]]:
    """Yield per batch: (item indices, features [B, V, D] float32, sha256s, failures (index, sha, reason)).
    With a model and a preset given (an exported scorer), no backbone plugin is consulted."""
    cfg.check()
    device = resolve_device(cfg.device)  # under torchrun, "cuda" is this rank's GPU (distributed.from_env)
    if model is None or preset is None:
        backbone = cfg.resolve()
        model = model if model is not None else backbone.build(cfg.weights)
        preset = backbone.preset
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = model.to(device, memory_format=torch.channels_last)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(len(rels))
    loader = torch.utils.data.DataLoader(
        ImageFiles(root, rels, cfg.views, preset, cfg.decoder),
        batch_size=cfg.batch_size or (128 if cuda else 16), shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=cuda, worker_init_fn=_worker_init if workers else None,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    done = 0
    for x, idx, shas, failures in loader:
        if isinstance(x, list):
            x, idx, shas, late = device_batch(x, idx, shas, cfg.views, device, preset)
            failures = failures + late
        feats = np.zeros((0, len(cfg.views), 0), np.float32)
        if x is not None:
            b, v = x.shape[:2]
            x = x.flatten(0, 1).to(device, non_blocking=True, memory_format=torch.channels_last)  # [B*V, 3, S, S]
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                        enabled=autocast_dtype is not None):
                y = model(x)  # [B*V, D]
            feats = y.float().reshape(b, v, -1).cpu().numpy()  # [B, V, D]
        done += len(idx) + len(failures)
        if progress:
            progress("extract", done, len(rels))
        yield idx, feats, shas, failures


@dataclass
class ExtractReport:
    cache: Path
    found: int
    extracted: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason) this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # discovery skips
    removed: list[str] = field(default_factory=list)  # in the cache, no longer in the folder
    pruned: bool = False
    rows: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layout: str = ""


def extract(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
            progress: Progress | None = None, prune: bool = False, strict: bool = False,
            only: set[str] | None = None, model: torch.nn.Module | None = None) -> ExtractReport:
    """Cache features for every image of a folder that the cache does not already hold with the same content.
    `only` restricts the run to these relative paths; `model` reuses an already built backbone."""
    t0 = time.perf_counter()
    cfg.check()
    spelled = Path(cache)
    cache = spelled.resolve()  # a symlinked cache is updated where it points; one lock however it is spelled
    disc = discover(data_dir)
    if only is not None:
        disc.samples = [s for s in disc.samples if s.rel in only]
    if not disc.samples:
        raise InputError(f"no images found in {data_dir}" + (f" ({len(disc.skipped)} files skipped)"
                                                              if disc.skipped else "") + disc.subfolder_hint())
    if strict and disc.skipped:
        rel, reason = disc.skipped[0]
        raise InputError(f"--strict: {len(disc.skipped)} files skipped, first {rel!r}: {reason}")
    prov = cfg.provenance()
    source = str(disc.root.resolve())
    report = ExtractReport(cache=spelled, found=len(disc.samples), skipped=disc.skipped, warnings=disc.warnings,
                           layout=disc.layout)
    dist = from_env(cfg.device)
    with _lock_once(cache, dist):
        had_cache = cache.exists()
        todo, drop = _plan(disc, source, cache, prov, report, prune, progress, dist)
        if dist:
            dist.barrier()  # all ranks have planned (and cleared stale temp parts) before any writes a part
        mine = dist.shard(todo) if dist else todo  # each rank a contiguous slice; parts are its resume units
        if mine:
            _extract_parts(disc.root, source, mine, cache, cfg, prov, report, progress, model,
                           tag=f"-r{dist.rank:04d}" if dist else "")
        if dist:  # every rank's parts are on disk before one rank assembles them
            gathered = dist.gather((report.extracted, report.failed))
            if dist.main:
                report.extracted = sum(g[0] for g in gathered)
                report.failed = [f for g in gathered for f in g[1]]
        error: CatdogError | None = None
        if dist is None or dist.main:
            try:
                # a whole-folder run that got here finished its folder: clear an earlier Ctrl-C's "incomplete"
                report.rows = _finish(cache, prov, report, todo, drop, strict, had_cache, data_dir,
                                      {source: False} if only is None else {})
            except CatdogError as e:
                error = e
        if dist:  # the outcome reaches every rank: the assembled cache exists, or all fail with one message
            message = dist.gather(str(error) if error else "")[0]
            if message and error is None:
                error = InputError(message)
        if error:
            raise error
    if dist:
        dist.close()
    report.seconds = time.perf_counter() - t0
    return report


def _finish(cache: Path, prov: Provenance, report: ExtractReport, todo: list[Sample], drop: set[tuple[str, bytes]],
            strict: bool, had_cache: bool, data_dir: str | os.PathLike[str], finished: dict[str, bool]) -> int:
    """Assemble the parts into the cache (or refuse under --strict); returns the cache's row count."""
    if strict:  # refuse to assemble; parts stay (they may hold an earlier run's saved work)
        failed = report.failed + [(os.fsdecode(p), reason) for part in list_parts(cache)
                                  for _, p, _, reason in read_index(part).failed if (os.fsdecode(p), reason)
                                  not in report.failed]
        if failed:
            rel, reason = failed[0]
            raise InputError(f"--strict: {len(failed)} files could not be decoded, first {rel!r}: {reason}; "
                             "nothing was added to the cache")
    if not (todo or drop or list_parts(cache)):
        index = read_index(cache)
        if not set(index.incomplete) & set(finished):
            return index.shape[0]
    index = assemble(cache, prov, versions(), drop, incomplete=finished)
    if index.shape[0] == 0 and not had_cache:
        cache.unlink()
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


def _plan(disc: Discovery, source: str, cache: Path, prov: Provenance, report: ExtractReport, prune: bool,
          progress: Progress | None, dist: Dist | None = None) -> tuple[list[Sample], set[tuple[str, bytes]]]:
    """What this run must extract (new or changed files) and drop (deleted files, with --prune). Under torchrun
    each rank hashes a slice of the already-known files and the ranks share the verdicts."""
    known: dict[bytes, str] = {}  # relative path -> sha256 already extracted (or failed) for this source
    old_paths: set[bytes] = set()
    for path in ([cache] if cache.exists() else []) + list_parts(cache):
        idx = read_index(path)
        diffs = idx.provenance.differences(prov, "the cache", "this extract")
        if diffs:
            if idx.provenance.arch != prov.arch or idx.provenance.layer != prov.layer:  # the rest follows from it
                diffs = [d for d in diffs if d.startswith(("arch", "layer"))]
            suggestion = cache.with_name(f"{prov.arch.replace(':', '-')}-{prov.layer}.h5")
            raise ProvenanceMismatch(f"{path} holds features made differently ({'; '.join(diffs)}): give --cache a new "
                                     f"file for these settings (e.g. --cache {suggestion}), or leave out the options "
                                     "that differ: adding to a cache uses its own settings "
                                     f"({matching_flags(idx.provenance)})")
        for key, sha in zip(idx.keys(), idx.sha256, strict=True):
            if key[0] == source:
                known[key[1]] = sha
                if path == cache:
                    old_paths.add(key[1])
        for s, p, sha, _ in idx.failed:
            if idx.sources[s] == source and sha:
                known[p] = sha
    candidates = [i for i, s in enumerate(disc.samples) if encode_path(s.rel) in known]
    mine = dist.shard(candidates) if dist else candidates
    unchanged: set[int] = set()
    for n, i in enumerate(mine):
        if progress and (n % 256 == 0 or n == len(mine) - 1):
            progress("hash", n + 1, len(mine))
        try:
            if sha256_file(disc.root / disc.samples[i].rel) == known[encode_path(disc.samples[i].rel)]:
                unchanged.add(i)
        except OSError:
            pass  # unreadable now: extract it again, which records the reason
    if dist:
        unchanged = set().union(*dist.gather(unchanged))
    todo = [s for i, s in enumerate(disc.samples) if i not in unchanged]
    report.reused = len(disc.samples) - len(todo)
    present = {encode_path(s.rel) for s in disc.samples}
    report.removed = sorted(os.fsdecode(p) for p in old_paths - present)
    report.pruned = prune and bool(report.removed)
    return todo, ({(source, encode_path(r)) for r in report.removed} if prune else set())


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
                   model: torch.nn.Module | None = None, tag: str = "") -> None:
    rels = [s.rel for s in todo]
    run_id = f"{time.time_ns():020d}-{os.getpid()}{tag}"
    rows, n_parts, last = Rows(), 0, time.monotonic()
    delay = float(os.environ.get("CATDOG_BATCH_DELAY", "0"))  # test hook: slow a run down to kill it midway

    def flush() -> None:
        nonlocal rows, n_parts, last
        if len(rows):
            # the feature size from the rows themselves; a part of failures only asks the backbone (a meta pass)
            dim = rows.features[0].shape[-1] if rows.features else cfg.resolve().dim
            write_part(cache, f"part-{run_id}-{n_parts:06d}", prov, source, rows, versions(),
                       (len(cfg.views), dim), cfg.weights.path)
            n_parts += 1
        rows, last = Rows(), time.monotonic()

    try:
        for idx, feats, shas, failures in run_features(root, rels, cfg, model, progress):
            for j, i in enumerate(idx):
                rows.features.append(feats[j])
                rows.paths.append(encode_path(rels[i]))
                rows.labels.append(todo[i].label)
                rows.sha256.append(shas[j])
            for i, sha, reason in failures:
                rows.failed_paths.append(encode_path(rels[i]))
                rows.failed_sha256.append(sha)
                rows.failed_reasons.append(reason)
                report.failed.append((rels[i], reason))
            report.extracted += len(idx)
            if delay:
                time.sleep(delay)
            if len(rows) >= cfg.part_rows or time.monotonic() - last > PART_SECONDS:
                flush()
        flush()
    except RuntimeError as e:  # a loader worker killed (e.g. by the OOM killer or a crashing decoder)
        flush()
        raise CatdogError(f"extraction stopped after {report.extracted} images ({str(e).splitlines()[0]}); the work "
                          "so far is saved: run extract again to resume, with --workers 0 to isolate a bad file") \
            from None
    except KeyboardInterrupt:
        flush()
        if not tag:  # under torchrun the next run assembles; ranks must not merge concurrently
            assemble(cache, prov, versions(), incomplete={source: True})  # `info` and `fit` say it is partial
        raise Interrupted(f"interrupted: {report.extracted} images saved to {cache}; run extract again to resume") \
            from None
