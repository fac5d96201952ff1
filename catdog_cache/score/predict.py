"""New folder -> its features, cached like the training side -> the head -> CSV rows and a Kaggle submission.

The first `predict` on a folder extracts its features into a cache (the same kind of file, crash safety and
incremental adds as `extract`); later ones, with any head trained on the same features, run no backbone."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbone import Preset
from ..cache import Provenance, encode_path, list_parts, open_cache, parts_dir, read_index, recorded
from ..engines.dispatch import extract
from ..errors import CacheBusy, CacheError, CatdogError, InputError, ProvenanceMismatch
from ..extract.config import ExtractConfig, Progress
from ..extract.forward import run_features
from ..extract.rerun import by_stat, same_content, verdicts
from ..files import as_paths, check_outputs, plausible_file, plural, printable, same_file
from ..fit import DEFAULT_HEAD, log_loss
from ..fit.head import CAT_DOG
from ..sources.folder import Discovery, Sample, discover
from .outputs import (
    check_submission,
    kaggle_id,
    submission_ids,
    write_predictions,
    write_submission,
)
from .scorer import Loaded, load_exported, load_scorer


@dataclass
class PredictReport:
    out: Path
    rows: list[tuple]  # (relative path, P(class) for each class in order, predicted class): p_cat, p_dog for two
    labels: list[int]  # index into classes, -1 where the folder does not say
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    submission: Path | None = None
    seconds: float = 0.0
    views: tuple[str, ...] = ("center",)
    cache: list[Path] | None = None  # where the folder's features are cached (None with --model)
    extracted: int = 0  # images that went through the backbone in this run
    neutral: list[str] = field(default_factory=list)  # files given 0.5 in the submission (could not be predicted)
    classes: list[str] = field(default_factory=lambda: list(CAT_DOG))  # the head's classes

    @property
    def accuracy(self) -> float | None:
        known = [(r[-1], y) for r, y in zip(self.rows, self.labels, strict=True) if y >= 0]
        return sum(lab == self.classes[y] for lab, y in known) / len(known) if known else None

    @property
    def log_loss(self) -> float | None:
        known = [(r[1:-1], y) for r, y in zip(self.rows, self.labels, strict=True) if y >= 0]
        return log_loss(np.array([p for p, _ in known]), np.array([y for _, y in known])) if known else None


def onto_head_classes(disc: Discovery, classes: list[str], head_path: Path | str) -> None:
    """Relabel a labeled folder's samples with the head's class ids, by name (a folder of some of the classes is
    scored; its accuracy and log loss count those). A class the head has no output for cannot be scored: refused."""
    if not disc.classes:
        return
    new = [c for c in disc.classes if c not in classes and any(s.label == disc.classes.index(c) for s in disc.samples)]
    if new:
        raise InputError(f"{disc.root} has images of classes head {head_path} was not trained on "
                         f"({', '.join(printable(c) for c in new[:5])}); its classes are "
                         f"{', '.join(printable(c) for c in classes)[:300]}: give a head trained on these classes, or "
                         "a folder of its classes (or unlabeled images)")
    ids = [classes.index(c) if c in classes else -1 for c in disc.classes]
    disc.samples = [Sample(s.rel, ids[s.label]) if s.label >= 0 else s for s in disc.samples]
    disc.classes = tuple(classes)


def default_cache(loaded: Loaded, head_path: Path, data_dir: Path, member: int = 0) -> Path:
    """Where a folder's features go unless --cache says otherwise: the head's training cache when it already holds
    this folder with the same provenance (preview on training images), else beside the head, named after the folder
    and the feature provenance (heads of another backbone get their own file)."""
    prov = loaded.members[member][0] if loaded.members else loaded.provenance
    trained = loaded.meta.get("caches") or [loaded.meta.get("cache")]
    trained_on = trained[member] if isinstance(trained, list) and member < len(trained) else None
    folder = str(data_dir.resolve())
    # the path is recorded in the head, a file from outside: opened only if it is a plain cache-like file (never a
    # link, FIFO or /proc file that blocks or never ends)
    if isinstance(trained_on, str) and not os.path.islink(trained_on) and plausible_file(trained_on, MAX_CACHE_BYTES,
                                                                                          min_size=8):
        try:
            with open_cache(trained_on) as (_, index):
                if folder in index.sources and index.provenance == prov:
                    return Path(trained_on)
        except CatdogError:  # a damaged or busy training cache is not this command's business: use the default
            pass
    digest = hashlib.sha256(prov.to_json().encode()).hexdigest()[:8]
    return unlinked(head_path.parent / f"{data_dir.resolve().name}.{digest}.h5")


MAX_CACHE_BYTES = 1 << 50  # only to refuse nonsense: real caches stay far below


def unlinked(cache: Path) -> Path:
    """A cache chosen by default is never reached through a symbolic link, nor are its lock and parts: a link
    planted in the head's folder would make predict create folders, an HDF5 file and a lock wherever it points.
    (An explicit --cache is the user's own choice and is followed, as extract follows it.)"""
    for p in (cache, cache.with_name(cache.name + ".lock"), parts_dir(cache), cache.with_name(cache.name + ".parts")):
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link; the default feature cache never follows one (remove it, or "
                             "give --cache PATH to use it on purpose)")
    return cache


@dataclass
class Scored:
    """A folder's rows in the cache(s), scored by the head."""

    rels: list[str]
    labels: list[int]
    probs: np.ndarray  # [N, K] (cat, dog for two classes), averaged over views with tta
    failed: list[tuple[str, str]]
    paths_all: list[bytes]  # every row of the (first) cache, for the training split
    rows: np.ndarray  # [N] row numbers in the (first) cache


def _folder_rows(cache: Path, disc: Discovery, views: tuple[str, ...] | None
                 ) -> tuple[dict[bytes, np.ndarray], list, list[bytes], dict[bytes, int]]:
    """The folder's rows of one cache (one contiguous range: rows are sorted by source folder), with the named views
    (None: the first, the one heads are trained on)."""
    folder = str(disc.root.resolve())
    present = {encode_path(s.rel) for s in disc.samples}
    with open_cache(cache) as (f, index):
        src = index.sources.index(folder) if folder in index.sources else -1
        rows = np.flatnonzero((index.source == src) & np.array([p in present for p in index.paths], bool))
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        x = f.read(lo, hi, view=None)[rows - lo]  # [N, V, D] float32
        failed = [(os.fsdecode(p), reason) for s, p, _, reason in index.failed if s == src and p in present]
        paths = index.paths
        names = index.provenance.views.split(",")
    x = x[:, [names.index(v) for v in views]] if views else x[:, :1]  # [N, V', D]
    if not np.isfinite(x.sum(dtype=np.float64)):  # one pass, as fit checks: NaN would reach the submission
        bad = [os.fsdecode(paths[r]) for r, ok in zip(rows, np.isfinite(x).reshape(len(x), -1).all(1), strict=True)
               if not ok]
        raise CacheError(f"{cache} holds NaN or infinite features for {len(bad)} images of {folder} (first "
                         f"{bad[0]!r}): delete it (or give --cache a new file) and run again")
    return {paths[r]: x[i] for i, r in enumerate(rows)}, failed, paths, {paths[r]: int(r) for r in rows}


def tta_views(loaded: Loaded) -> tuple[str, ...]:
    """The views every backbone of the head has, in the first one's order: an ensemble's caches are joined view by
    view, so test-time augmentation averages only the views they share."""
    member_views = [p.views.split(",") for p, _ in loaded.members] or [loaded.provenance.views.split(",")]
    return tuple(v for v in member_views[0] if all(v in m for m in member_views[1:]))


def score_cached(loaded: Loaded, caches: list[Path], disc: Discovery, tta: bool) -> Scored:
    """Apply the head to the folder's cached features (an ensemble's caches joined side by side, by file)."""
    label = {encode_path(s.rel): s.label for s in disc.samples}
    parts = [_folder_rows(c, disc, tta_views(loaded) if tta else None) for c in caches]
    keys = [k for k in parts[0][0] if all(k in p[0] for p in parts[1:])]  # sorted as the first cache
    failed = sorted({f for p in parts for f in p[1]})
    if keys:
        x = torch.from_numpy(np.stack([np.concatenate([p[0][k] for p in parts], axis=-1) for k in keys]))
        n, v = x.shape[:2]  # [N, V', D]
        if loaded.head is None or x.shape[-1] != loaded.head.in_dim:  # before use: a bad matmul is a traceback
            raise CacheError(f"the head takes {loaded.head.in_dim if loaded.head else '?'}-d features, but its "
                             f"provenance made {x.shape[-1]}-d ones in {', '.join(map(str, caches))}; the head or "
                             "the cache is damaged or crafted")
        k = len(loaded.classes)
        probs = loaded.probabilities(x.reshape(n * v, -1)).reshape(n, v, k).mean(1)  # [N, K]
    else:
        probs = torch.zeros(0, len(loaded.classes))
    return Scored([os.fsdecode(k) for k in keys], [label[k] for k in keys], probs.numpy(), failed, parts[0][2],
                  np.array([parts[0][3][k] for k in keys], np.int64))


def cached_features(loaded: Loaded, head_path: Path, data_dir: Path, caches: list[Path] | None, device: str,
                    batch_size: int, workers: int, progress: Progress | None, stage: str, explicit: bool | None = None
                    ) -> tuple[list[Path], int]:
    """Make sure the folder's features are cached for each backbone of the head (extracting only what is new or
    changed); returns the caches and how many images went through a backbone. A cache that already holds every
    file of the folder is only read: no lock, so heads on read-only media and concurrent predicts work."""
    n = max(len(loaded.members), 1)
    if caches and len(caches) != n:
        raise InputError(f"--cache: the head needs {n} feature caches (one per backbone), got {len(caches)}")
    explicit = bool(caches) if explicit is None else explicit  # --cache given (not chosen by default_cache)
    caches = caches or [default_cache(loaded, head_path, data_dir, i) for i in range(n)]
    relabel = (lambda s, d, t: progress(stage if s == "extract" else s, d, t)) if progress else None
    extracted = 0
    trained = training_caches(loaded.meta)
    for i, cache in enumerate(caches):
        cfg = loaded.config(device, batch_size, workers, member=i)
        if explicit:
            _check_provenance(cache, cfg.provenance(), head_path, stage)
        if any(same_file(cache, t) for t in trained):  # scoring reads a training cache, never adds to it
            _check_covered(cache, data_dir, head_path, explicit, relabel)
            continue
        if not up_to_date(data_dir, cache, cfg, relabel):
            extracted += _extract_waiting(data_dir, cache, cfg, relabel)
    return caches, extracted


LOCK_WAIT = 600.0  # seconds predict waits for another extract of the same cache (CATDOG_LOCK_WAIT overrides)


def up_to_date(data_dir: Path, cache: Path, cfg: ExtractConfig, progress: Progress | None = None) -> bool:
    """Whether extract would have nothing to do: every file of the folder is in the cache (as a row or a recorded
    failure) with the same content hash and provenance, and no part waits for assembly. Decided as extract's _plan
    decides, but read-only: no lock, no folder made, no stale part removed. Under torchrun the ranks decide together
    in extract itself."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        return False
    cfg.check()
    cache = cache.resolve()
    if not cache.is_file() or list_parts(cache, clean=False):  # shards not yet in the index: extract lists them
        return False
    disc = discover(data_dir)
    source = str(disc.root.resolve())
    index = read_index(cache)
    if index.provenance != cfg.provenance():  # extract says how they differ
        return False
    known = recorded([index], source)
    if any(encode_path(s.rel) not in known for s in disc.samples):
        return False
    # extract's rule (rerun.py): unchanged by stat, else by hash; stops at the first changed file
    _, slow = by_stat(disc, known, list(range(len(disc.samples))))
    for n, i in enumerate(slow):
        if progress and (n % 256 == 0 or n == len(slow) - 1):
            progress("hash", n + 1, len(slow))
        if not same_content(disc.root / disc.samples[i].rel, known.sha256(encode_path(disc.samples[i].rel))):
            return False
    return True


def _extract_waiting(data_dir: Path, cache: Path, cfg: ExtractConfig, progress: Progress | None) -> int:
    """extract(), waiting while another process holds the cache's lock (it may be extracting this very folder, and
    then this run finds it cached): two predicts on one folder both succeed."""
    try:
        wait = float(os.environ.get("CATDOG_LOCK_WAIT", LOCK_WAIT))
    except ValueError:
        raise InputError(f"CATDOG_LOCK_WAIT: expected seconds, got {os.environ['CATDOG_LOCK_WAIT']!r}") from None
    t0, pause = time.monotonic(), 0.1
    while True:
        try:
            return extract(data_dir, cache, cfg, progress=progress).extracted
        except CacheBusy as e:
            waited = time.monotonic() - t0
            if not waited < wait:
                raise CacheBusy(f"{e} (waited {waited:.0f} s; CATDOG_LOCK_WAIT=SECONDS waits longer)") from None
            if progress:
                progress("waiting", min(int(waited), int(wait)), int(wait))
            pause = min(2.0, pause * 2)  # each try discovers the folder again: not too often
            time.sleep(min(pause, max(wait - waited, 0.0)))


def training_caches(meta: dict) -> list[Path]:
    """The caches a head was trained on, as its meta records them (a file from outside: strings only)."""
    recorded = meta.get("caches") if isinstance(meta.get("caches"), list) else [meta.get("cache")]
    return [Path(c) for c in recorded if isinstance(c, str) and c]


def _check_provenance(cache: Path, want: Provenance, head_path: Path, stage: str) -> None:
    """A --cache of other features, worded for predict/preview (extract's own refusal speaks of extract flags)."""
    if not cache.exists() or cache.is_dir():
        return
    diffs = read_index(cache).provenance.differences(want, "the cache", "the head")
    if diffs:
        raise ProvenanceMismatch(f"--cache {cache} holds features made differently from the ones head {head_path} was "
                                 f"trained on ({'; '.join(diffs)}): give {stage} a cache of this head's features, or "
                                 "drop --cache (the features then go beside the head)")


def _check_covered(cache: Path, data_dir: Path, head_path: Path, explicit: bool, progress: Progress | None) -> None:
    """The head's training cache already holds every file of the folder, unchanged: score from it. Anything it
    lacks is refused, not added: the next fit would train on it (held-out photos leaking into training)."""
    disc = discover(data_dir)
    folder = str(disc.root.resolve())
    index = read_index(cache)
    known = recorded([index], folder)
    missing = [s.rel for s in disc.samples if encode_path(s.rel) not in known]
    changed: list[str] = []
    if not missing:  # extract's rule (rerun.py): unchanged by stat, else by hash
        found = verdicts(disc, known, list(range(len(disc.samples))), 0, progress=progress)
        changed = [s.rel for i, s in enumerate(disc.samples) if i not in found.unchanged]
    if not (missing or changed):
        return
    what = (f"{len(missing):,} of the {len(disc.samples):,} images of {data_dir} are not in it" if missing
            else f"{len(changed):,} images of {data_dir} changed since it was extracted")
    if explicit:
        raise InputError(f"--cache {cache} is the cache head {head_path} was trained on and {what}; scoring never "
                         "adds images to a training cache (the next fit would train on them): drop --cache (the "
                         "features then go beside the head); adding labeled folders to a training cache is "
                         "`catdog-cache extract`'s job")
    raise InputError(f"{data_dir} is in the training cache {cache} of head {head_path}, but {what}; scoring never adds "
                     f"to a training cache: run `catdog-cache extract {data_dir} --cache {cache}` first (the next fit "
                     "trains on them), or give --cache NEW.h5 to score the folder apart")


def predict(data_dir: str | os.PathLike[str], head_path: str | os.PathLike[str] | None, out: str | os.PathLike[str],
            submission: str | os.PathLike[str] | None = None, weights_file: str | None = None,
            device: str = "auto", batch_size: int = 0, workers: int = -1, progress: Progress | None = None,
            tta: bool = False, model_path: str | os.PathLike[str] | None = None,
            cache: str | os.PathLike[str] | list | None = None) -> PredictReport:
    t0 = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    head_path = Path(head_path or DEFAULT_HEAD)
    submission = Path(submission) if submission else None
    caches = as_paths(cache)
    check_outputs({"--out": out, "--submission": submission},
                  {"--head": head_path, "--model": Path(model_path) if model_path else None,
                   **{f"--cache {c}": c for c in caches}})
    disc = discover(data_dir)
    if not disc.samples:
        raise InputError(f"no images found in {data_dir}" + (f" ({plural(len(disc.skipped), 'file')} skipped)"
                                                              if disc.skipped else ""))
    if model_path:
        if caches:
            raise InputError("--cache and --model: an exported model reads images, not caches; drop --cache")
        loaded = load_exported(model_path)
        if submission:
            check_submission(loaded.classes, model_path)
        ids = submission_ids(disc) if submission else None  # before any forward pass
        onto_head_classes(disc, loaded.classes, model_path)
        views = _check_tta(loaded, tta)
        scored, used, extracted = _score_images(loaded, disc, views, device, batch_size, workers, progress), None, 0
    else:
        loaded = load_scorer(head_path, weights_file, backbone=False)
        if submission:
            check_submission(loaded.classes, head_path)
        ids = submission_ids(disc) if submission else None  # before any forward pass
        onto_head_classes(disc, loaded.classes, head_path)
        views = _check_tta(loaded, tta)
        planned = caches or [default_cache(loaded, head_path, data_dir, i) for i in range(len(loaded.members))]
        check_outputs({"--out": out, "--submission": submission}, {f"the feature cache {c}": c for c in planned})
        used, extracted = cached_features(loaded, head_path, data_dir, planned, device, batch_size, workers,
                                          progress, "predict", explicit=bool(caches))
        scored = score_cached(loaded, used, disc, tta)
    if not scored.rels:
        first = f"; first failure: {scored.failed[0][0]!r}: {scored.failed[0][1]}" if scored.failed else ""
        raise InputError(f"no image in {data_dir} could be predicted{first}")
    # the first of equal probabilities wins (argmax): cat on a 0.5 tie, as before K classes
    rows = [(rel, *map(float, p), loaded.classes[int(np.argmax(p))]) for rel, p in zip(scored.rels, scored.probs,
                                                                                      strict=True)]
    neutral: list[str] = []
    main = os.environ.get("RANK", "0") == "0"  # under torchrun every rank extracts a share; rank 0 alone writes
    if submission and ids is not None:
        predicted = {kaggle_id(r[0]): r[2] for r in rows}
        neutral = [rel for i, rel in sorted(ids.items()) if i not in predicted]
        if main:
            write_submission(submission, {i: predicted.get(i, 0.5) for i in ids}, loaded.clip)
    if main:
        write_predictions(out, rows, scored.labels, loaded.classes)
    return PredictReport(out, rows, scored.labels, scored.failed, disc.skipped, submission,
                         time.perf_counter() - t0, views, used, extracted, neutral, loaded.classes)


def _check_tta(loaded: Loaded, tta: bool) -> tuple[str, ...]:
    head_views = tta_views(loaded)
    if tta and len(head_views) < 2:
        if len(loaded.members) > 1:
            raise InputError(f"--tta: the ensemble's backbones share one view ({','.join(head_views) or 'none'}; "
                             f"theirs: {' / '.join(p.views for p, _ in loaded.members)}); extract each of them with "
                             "--views center,flip and fit again to use test-time augmentation")
        raise InputError(f"--tta: the head's features have one view ({loaded.provenance.views}); extract with "
                         "--views center,flip and fit again to use test-time augmentation")
    return head_views if tta else ("center",)


def _score_images(loaded: Loaded, disc: Discovery, views: tuple[str, ...], device: str, batch_size: int,
                  workers: int, progress: Progress | None) -> Scored:
    """--model: an exported scorer runs on the images themselves (no cache, no head file)."""
    rels = [s.rel for s in disc.samples]
    cfg = loaded.config(device, batch_size, workers, views=views)
    relabel = (lambda s, d, t: progress("predict" if s == "extract" else s, d, t)) if progress else None
    probs: dict[int, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    preset = Preset.from_spec(loaded.provenance.transform)  # the export's own record, not today's plugin
    for idx, p, _, failures in run_features(disc.root, rels, cfg, model=loaded.scorer, progress=relabel,
                                            preset=preset):
        if p.shape[-1] != len(loaded.classes):  # an export's program and its metadata disagree: before use
            raise CacheError(f"the exported model outputs {p.shape[-1]} probabilities for its "
                             f"{len(loaded.classes)} classes; damaged or crafted")
        for j, i in enumerate(idx):
            probs[i] = p[j].mean(axis=0)  # [K]: the average over views
        failed += [(rels[i], reason) for i, _, reason in failures]
    keep = sorted(probs)
    return Scored([rels[i] for i in keep], [disc.samples[i].label for i in keep],
                  np.array([probs[i] for i in keep]).reshape(-1, len(loaded.classes)), failed, [], np.array(keep))
