"""New input -> its features, cached like the training side -> the head -> CSV rows and a Kaggle submission.

An input is anything extract takes: a folder, or tar shards (a .tar, a brace pattern, a listing, a URL). The first
`predict` on it extracts its features into a cache through extract itself (the same kind of file, crash safety,
incremental adds, done markers per shard); later ones, with any head trained on the same features, run no backbone:
extract's plan, decided read-only (extract.plan.pending), says there is nothing to read."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbone import Preset
from ..cache import Provenance, View, encode_path, encode_paths, open_cache, parts_dir, read_index
from ..engines.dispatch import extract
from ..errors import CacheBusy, CacheError, CatdogError, InputError, ProvenanceMismatch
from ..extract.config import ExtractConfig, Progress
from ..extract.forward import run_dataset, run_features
from ..extract.plan import pending
from ..extract.plan import up_to_date as nothing_to_read
from ..files import as_paths, check_outputs, plausible_file, printable, same_file
from ..fit import DEFAULT_HEAD, log_loss
from ..fit.head import CAT_DOG
from ..sources.folder import Discovery, Sample
from .inputs import ScoreInput, folder_samples, score_input
from .outputs import (
    check_submission,
    kaggle_id,
    key_ids,
    submission_ids,
    write_predictions,
    write_submission,
)
from .scorer import Loaded, load_exported, load_scorer

Key = tuple[str, bytes]  # a row's (source, path): a folder's relative path, a tar shard's sample key


@dataclass
class PredictReport:
    out: Path
    rows: list[tuple]  # (name, P(class) for each class in order, predicted class): p_cat, p_dog for two; the name
    # is a folder's relative path, a tar sample's `<shard file name>#<key>` (inputs.ScoreInput.row_name)
    labels: list[int]  # index into classes, -1 where the folder does not say
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    submission: Path | None = None
    seconds: float = 0.0
    views: tuple[str, ...] = ("center",)
    cache: list[Path] | None = None  # where the input's features are cached (None with --model)
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


def default_cache(loaded: Loaded, head_path: Path, data_dir: str | os.PathLike[str] | ScoreInput, member: int = 0
                  ) -> Path:
    """Where an input's features go unless --cache says otherwise: the head's training cache when it already holds
    this input (the folder, or every shard) with the same provenance (preview on training images), else beside the
    head, named after the input and the feature provenance (heads of another backbone get their own file)."""
    inp = score_input(data_dir)
    prov = loaded.members[member][0] if loaded.members else loaded.provenance
    trained = loaded.meta.get("caches") or [loaded.meta.get("cache")]
    trained_on = trained[member] if isinstance(trained, list) and member < len(trained) else None
    # the path is recorded in the head, a file from outside: opened only if it is a plain cache-like file (never a
    # link, FIFO or /proc file that blocks or never ends)
    if isinstance(trained_on, str) and not os.path.islink(trained_on) and plausible_file(trained_on, MAX_CACHE_BYTES,
                                                                                          min_size=8):
        try:
            with open_cache(trained_on) as (_, index):
                if set(inp.sources) <= set(index.sources) and index.provenance == prov:
                    return Path(trained_on)
        except CatdogError:  # a damaged or busy training cache is not this command's business: use the default
            pass
    digest = hashlib.sha256(prov.to_json().encode()).hexdigest()[:8]
    return unlinked(head_path.parent / f"{inp.cache_name()}.{digest}.h5")


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
    """An input's rows in the cache(s), scored by the head."""

    rels: list[str]  # how outputs name each row (ScoreInput.row_name)
    labels: list[int]
    probs: np.ndarray  # [N, K] (cat, dog for two classes), averaged over views with tta
    failed: list[tuple[str, str]]
    paths_all: list[bytes]  # every row of the (first) cache, for the training split
    rows: np.ndarray  # [N] row numbers in the (first) cache
    keys: list[str] = field(default_factory=list)  # each row's path or sample key: what a Kaggle id is read from
    failed_keys: list[str] = field(default_factory=list)  # the same, for each failure
    sources: list[str] = field(default_factory=list)  # each row's source: the folder, or its tar shard


@dataclass
class CachedRows:
    """An input's rows of one cache, in the input's order (its shards as listed; each source's rows by key)."""

    x: dict[Key, np.ndarray]  # [V', D] each
    failed: list[tuple[Key, str]]
    paths: list[bytes]  # every row of the cache
    row: dict[Key, int]
    label: dict[Key, int]  # the cache's label: an index into `classes`
    classes: list[str]


GAP_ROWS = 1024  # rows of other inputs read and dropped rather than split into two reads


def read_rows(f: View, rows: np.ndarray) -> np.ndarray:
    """Features [len(rows), V, D] of these logical rows (any order), in few contiguous reads."""
    order = np.argsort(rows, kind="stable")
    srt = rows[order]  # [N]
    out = np.empty((len(rows), *f.index.shape[1:]), np.float32)  # [N, V, D]
    if not len(rows):
        return out
    cuts = (np.flatnonzero(np.diff(srt) > GAP_ROWS) + 1).tolist()
    for a, b in zip([0, *cuts], [*cuts, len(srt)], strict=True):
        lo, hi = int(srt[a]), int(srt[b - 1]) + 1
        out[order[a:b]] = f.read(lo, hi, view=None)[srt[a:b] - lo]
    return out


def _input_rows(cache: Path, inp: ScoreInput, views: tuple[str, ...] | None) -> CachedRows:
    """The input's rows of one cache with the named views (None: the first, the one heads are trained on): a
    folder's discovered files, or every row of each tar shard."""
    present = None if inp.tars else set(encode_paths(inp.discovery().rels))
    with open_cache(cache) as (f, index):
        at = {s: i for i, s in enumerate(index.sources)}
        pos = {at[s]: n for n, s in enumerate(inp.sources) if s in at}  # cache source id -> place in the input
        rows = np.flatnonzero(np.isin(index.source, np.fromiter(pos, np.int64, len(pos))))
        if present is not None:
            rows = rows[np.fromiter((index.paths[r] in present for r in rows.tolist()), bool, len(rows))]
        if len(pos) > 1:  # the input's order: shards as listed, each one's rows as the cache sorts them (by key)
            rows = rows[np.argsort(np.array([pos[s] for s in index.source[rows].tolist()], np.int64), kind="stable")]
        x = read_rows(f, rows)  # [N, V, D] float32
        failed = [((index.sources[s], p), reason) for s, p, _, reason in index.failed
                  if s in pos and (present is None or p in present)]
        failed.sort(key=lambda fr: pos[at[fr[0][0]]])
        keys = [(index.sources[s], index.paths[r]) for s, r in zip(index.source[rows].tolist(), rows.tolist(),
                                                                      strict=True)]
        labels = index.labels[rows].tolist()
        paths, classes = index.paths, list(index.classes)
        names = index.provenance.views.split(",")
    x = x[:, [names.index(v) for v in views]] if views else x[:, :1]  # [N, V', D]
    if not np.isfinite(x.sum(dtype=np.float64)):  # one pass, as fit checks: NaN would reach the submission
        bad = [inp.row_name(k[0], os.fsdecode(k[1])) for k, ok in zip(keys, np.isfinite(x).reshape(len(x), -1).all(1),
                                                                      strict=True) if not ok]
        raise CacheError(f"{cache} holds NaN or infinite features for {len(bad)} images of {inp.spec} (first "
                         f"{bad[0]!r}): delete it (or give --cache a new file) and run again")
    return CachedRows(dict(zip(keys, x, strict=True)), failed, paths, dict(zip(keys, rows.tolist(), strict=True)),
                      dict(zip(keys, labels, strict=True)), classes)


def tta_views(loaded: Loaded) -> tuple[str, ...]:
    """The views every backbone of the head has, in the first one's order: an ensemble's caches are joined view by
    view, so test-time augmentation averages only the views they share."""
    member_views = [p.views.split(",") for p, _ in loaded.members] or [loaded.provenance.views.split(",")]
    return tuple(v for v in member_views[0] if all(v in m for m in member_views[1:]))


def score_cached(loaded: Loaded, caches: list[Path], data: ScoreInput | Discovery | str | os.PathLike[str],
                 tta: bool) -> Scored:
    """Apply the head to the input's cached features (an ensemble's caches joined side by side, by row key). A
    folder's labels are its Discovery's (already matched to the head's classes); tar rows' are the cache's, matched
    to the head's classes by name."""
    inp = score_input(data)
    parts = [_input_rows(c, inp, tta_views(loaded) if tta else None) for c in caches]
    keys = [k for k in parts[0].x if all(k in p.x for p in parts[1:])]  # in the input's order, as the first cache
    if inp.tars:
        label = _onto_head(parts[0], loaded.classes, inp.spec)
    else:
        by_path = {encode_path(s.rel): s.label for s in inp.discovery().samples}
        label = {k: by_path[k[1]] for k in keys}
    failed = sorted({(inp.row_name(src, os.fsdecode(p)), reason, os.fsdecode(p)) for q in parts
                     for (src, p), reason in q.failed})
    if keys:
        x = torch.from_numpy(np.stack([np.concatenate([p.x[k] for p in parts], axis=-1) for k in keys]))
        n, v = x.shape[:2]  # [N, V', D]
        if loaded.head is None or x.shape[-1] != loaded.head.in_dim:  # before use: a bad matmul is a traceback
            raise CacheError(f"the head takes {loaded.head.in_dim if loaded.head else '?'}-d features, but its "
                             f"provenance made {x.shape[-1]}-d ones in {', '.join(map(str, caches))}; the head or "
                             "the cache is damaged or crafted")
        k = len(loaded.classes)
        probs = loaded.probabilities(x.reshape(n * v, -1)).reshape(n, v, k).mean(1)  # [N, K]
    else:
        probs = torch.zeros(0, len(loaded.classes))
    return Scored([inp.row_name(src, os.fsdecode(p)) for src, p in keys], [label[k] for k in keys], probs.numpy(),
                  [(name, reason) for name, reason, _ in failed], parts[0].paths,
                  np.array([parts[0].row[k] for k in keys], np.int64), [os.fsdecode(p) for _, p in keys],
                  [key for _, _, key in failed], [src for src, _ in keys])


def _onto_head(part: CachedRows, classes: list[str], spec: str) -> dict[Key, int]:
    """Tar rows' labels (the cache's class ids) as the head's, by name. A class the head has no output for cannot
    be scored: refused, as for a folder (onto_head_classes)."""
    ids = [classes.index(c) if c in classes else -1 for c in part.classes]
    new = sorted({part.classes[y] for y in part.label.values() if 0 <= y < len(ids) and ids[y] < 0})
    if new:
        raise InputError(f"{printable(spec)} has images of classes the head was not trained on "
                         f"({', '.join(printable(c) for c in new[:5])}); its classes are "
                         f"{', '.join(printable(c) for c in classes)[:300]}: give a head trained on these classes, or "
                         "shards of its classes (or unlabeled ones)")
    return {k: ids[y] if 0 <= y < len(ids) else -1 for k, y in part.label.items()}


def cached_features(loaded: Loaded, head_path: Path, data_dir: str | os.PathLike[str] | ScoreInput,
                    caches: list[Path] | None, device: str, batch_size: int, workers: int, progress: Progress | None,
                    stage: str, explicit: bool | None = None) -> tuple[list[Path], int]:
    """Make sure the input's features are cached for each backbone of the head (extracting only what is new or
    changed, through extract itself); returns the caches and how many images went through a backbone. A cache that
    already holds the whole input is only read: no lock, so heads on read-only media and concurrent predicts work."""
    inp = score_input(data_dir)
    n = max(len(loaded.members), 1)
    if caches and len(caches) != n:
        raise InputError(f"--cache: the head needs {n} feature caches (one per backbone), got {len(caches)}")
    explicit = bool(caches) if explicit is None else explicit  # --cache given (not chosen by default_cache)
    caches = caches or [default_cache(loaded, head_path, inp, i) for i in range(n)]
    relabel = (lambda s, d, t: progress(stage if s == "extract" else s, d, t)) if progress else None
    extracted = 0
    trained = training_caches(loaded.meta)
    for i, cache in enumerate(caches):
        cfg = loaded.config(device, batch_size, workers, member=i)
        if explicit:
            _check_provenance(cache, cfg.provenance(), head_path, stage)
        if any(same_file(cache, t) for t in trained):  # scoring reads a training cache, never adds to it
            _check_covered(cache, inp, head_path, explicit, relabel, cfg.provenance())
            continue
        if not up_to_date(inp, cache, cfg, relabel):
            classes = _tar_classes(cache, loaded) if inp.tars else None
            extracted += _extract_waiting(inp.spec, cache, cfg, relabel, classes)
    return caches, extracted


LOCK_WAIT = 600.0  # seconds predict waits for another extract of the same cache (CATDOG_LOCK_WAIT overrides)


def up_to_date(data_dir: str | os.PathLike[str] | ScoreInput, cache: Path, cfg: ExtractConfig,
               progress: Progress | None = None) -> bool:
    """Whether extract would have nothing to do for the input (extract.plan.up_to_date: its plan, read-only), with a
    folder's walk taken once per command (the ScoreInput's)."""
    cfg.check()
    inp = score_input(data_dir)
    return nothing_to_read(inp.spec, cache, cfg.provenance(), progress, None if inp.tars else inp.discovery(),
                           inp.shards)


def _tar_classes(cache: Path, loaded: Loaded) -> tuple[str, ...] | None:
    """What tar shards' `.cls` indexes mean when predict extracts them: the head's classes (0 cat, 1 dog for a cat/dog
    head), unless the cache already labels with classes of its own (extract keeps a cache's classes: None)."""
    try:
        index = read_index(cache) if cache.is_file() else None
    except CatdogError:
        return None  # extract reports what is wrong with it
    if index is not None and index.labeled and index.classes != list(loaded.classes):
        return None
    return tuple(loaded.classes)


def _extract_waiting(data_dir: str, cache: Path, cfg: ExtractConfig, progress: Progress | None,
                     classes: tuple[str, ...] | None = None) -> int:
    """extract(), waiting while another process holds the cache's lock (it may be extracting this very input, and
    then this run finds it cached): two predicts on one input both succeed."""
    try:
        wait = float(os.environ.get("CATDOG_LOCK_WAIT", LOCK_WAIT))
    except ValueError:
        raise InputError(f"CATDOG_LOCK_WAIT: expected seconds, got {os.environ['CATDOG_LOCK_WAIT']!r}") from None
    t0, pause = time.monotonic(), 0.1
    while True:
        try:
            return extract(data_dir, cache, cfg, progress=progress, classes=classes).extracted
        except CacheBusy as e:
            waited = time.monotonic() - t0
            if not waited < wait:
                raise CacheBusy(f"{e} (waited {waited:.0f} s; CATDOG_LOCK_WAIT=SECONDS waits longer)") from None
            if progress:
                progress("waiting", min(int(waited), int(wait)), int(wait))
            pause = min(2.0, pause * 2)  # each try plans the input again: not too often
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


def _check_covered(cache: Path, data_dir: str | os.PathLike[str] | ScoreInput, head_path: Path, explicit: bool,
                   progress: Progress | None, prov: Provenance | None = None) -> None:
    """The head's training cache already holds the whole input, unchanged (extract.plan.pending, on the cache's own
    index): score from it. Anything it lacks is refused, not added: the next fit would train on it (held-out photos
    leaking into training)."""
    inp = score_input(data_dir)
    prov = prov if prov is not None else read_index(cache).provenance
    left = pending(inp.spec, cache, prov, progress, None if inp.tars else inp.discovery(), inp.shards, parts=False)
    if not left:
        return
    data = printable(inp.spec)
    if left.other:
        what = f"it cannot vouch for {data} ({left.other})"
    elif inp.tars:
        what = f"{left.new:,} of the {left.total:,} shards of {data} are not in it as they are now"
    elif left.new:
        what = f"{left.new:,} of the {left.total:,} images of {data} are not in it"
    else:
        what = f"{left.changed:,} images of {data} changed since it was extracted"
    if explicit:
        raise InputError(f"--cache {cache} is the cache head {head_path} was trained on and {what}; scoring never "
                         "adds images to a training cache (the next fit would train on them): drop --cache (the "
                         "features then go beside the head); adding labeled inputs to a training cache is "
                         "`catdog-cache extract`'s job")
    arg = f"'{data}'" if any(c in data for c in "{ ") else data  # a brace pattern quoted for the shell
    raise InputError(f"{data} is in the training cache {cache} of head {head_path}, but {what}; scoring never adds "
                     f"to a training cache: run `catdog-cache extract {arg} --cache {cache}` first (the next fit "
                     "trains on them), or give --cache NEW.h5 to score the input apart")


def predict(data_dir: str | os.PathLike[str], head_path: str | os.PathLike[str] | None, out: str | os.PathLike[str],
            submission: str | os.PathLike[str] | None = None, weights_file: str | None = None,
            device: str = "auto", batch_size: int = 0, workers: int = -1, progress: Progress | None = None,
            tta: bool = False, model_path: str | os.PathLike[str] | None = None,
            cache: str | os.PathLike[str] | list | None = None) -> PredictReport:
    """Score every image of an input extract takes (a folder; or tar shards: a .tar, a brace pattern, a listing, a
    URL) with a head (its features cached on the way) or an exported --model (no cache): the CSV, and the Kaggle
    submission (ids from numeric file names, or tar keys' numeric stems)."""
    t0 = time.perf_counter()
    out = Path(out)
    head_path = Path(head_path or DEFAULT_HEAD)
    submission = Path(submission) if submission else None
    caches = as_paths(cache)
    check_outputs({"--out": out, "--submission": submission},
                  {"--head": head_path, "--model": Path(model_path) if model_path else None,
                   **{f"--cache {c}": c for c in caches}})
    inp = score_input(data_dir)
    disc = None if inp.tars else folder_samples(inp)  # a folder's one walk, passed along from here
    if model_path:
        if caches:
            raise InputError("--cache and --model: an exported model reads images, not caches; drop --cache")
        loaded = load_exported(model_path)
        if submission:
            check_submission(loaded.classes, model_path)
        ids = submission_ids(disc) if submission and disc else None  # before any forward pass
        if disc:
            onto_head_classes(disc, loaded.classes, model_path)
        views = _check_tta(loaded, tta)
        scored = _score_tar_images(loaded, inp, views, device, batch_size, workers, progress) if inp.tars else \
            _score_images(loaded, disc, views, device, batch_size, workers, progress)
        used, extracted = None, 0
    else:
        loaded = load_scorer(head_path, weights_file, backbone=False)
        if submission:
            check_submission(loaded.classes, head_path)
        ids = submission_ids(disc) if submission and disc else None  # before any forward pass
        if disc:
            onto_head_classes(disc, loaded.classes, head_path)
        views = _check_tta(loaded, tta)
        planned = caches or [default_cache(loaded, head_path, inp, i) for i in range(len(loaded.members))]
        check_outputs({"--out": out, "--submission": submission}, {f"the feature cache {c}": c for c in planned})
        used, extracted = cached_features(loaded, head_path, inp, planned, device, batch_size, workers,
                                          progress, "predict", explicit=bool(caches))
        scored = score_cached(loaded, used, inp, tta)
    if submission and inp.tars:  # a shard's keys are known once it is read: checked after extraction (cached)
        ids = key_ids(list(zip(scored.keys + scored.failed_keys, scored.rels + [f for f, _ in scored.failed],
                               strict=True)))
    if not scored.rels:
        first = f"; first failure: {scored.failed[0][0]!r}: {scored.failed[0][1]}" if scored.failed else ""
        raise InputError(f"no image in {printable(inp.spec)} could be predicted{first}")
    # the first of equal probabilities wins (argmax): cat on a 0.5 tie, as before K classes
    rows = [(rel, *map(float, p), loaded.classes[int(np.argmax(p))]) for rel, p in zip(scored.rels, scored.probs,
                                                                                      strict=True)]
    neutral: list[str] = []
    main = os.environ.get("RANK", "0") == "0"  # under torchrun every rank extracts a share; rank 0 alone writes
    if submission and ids is not None:
        predicted = {kaggle_id(key): r[2] for key, r in zip(scored.keys or scored.rels, rows, strict=True)}
        neutral = [rel for i, rel in sorted(ids.items()) if i not in predicted]
        if main:
            write_submission(submission, {i: predicted.get(i, 0.5) for i in ids}, loaded.clip)
    if main:
        write_predictions(out, rows, scored.labels, loaded.classes)
    return PredictReport(out, rows, scored.labels, scored.failed, disc.skipped if disc else [], submission,
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


def _score_tar_images(loaded: Loaded, inp: ScoreInput, views: tuple[str, ...], device: str, batch_size: int,
                      workers: int, progress: Progress | None) -> Scored:
    """--model on tar shards: the exported scorer on each sample, streamed from the shards as extract reads them
    (tars.TarShards); `.cls` indexes the model's classes. Rows in the order the cache route gives: shards as
    listed, samples by key."""
    from ..extract.tar_units import default_tar_workers
    from ..sources.spec import Identity, identity
    from ..sources.tars import End, TarShards

    assert inp.shards is not None
    cfg = loaded.config(device, batch_size, workers, views=views)
    cfg.check()
    preset = Preset.from_spec(loaded.provenance.transform)  # the export's own record, not today's plugin
    dataset = TarShards(inp.shards, cfg.views, preset, cfg.decoder, tuple(loaded.classes))

    def size(source: str) -> Identity:
        try:
            return identity(source)
        except OSError:
            return Identity(-1, "")

    n_workers = cfg.workers if cfg.workers >= 0 else default_tar_workers([size(s) for s in inp.shards])
    probs: dict[tuple[int, str], np.ndarray] = {}
    labels: dict[tuple[int, str], int] = {}
    failed: list[tuple[str, str, str]] = []  # (name, reason, key)
    ended: dict[int, int] = {}
    for refs, p, _, failures in run_dataset(dataset, 0, n_workers, cfg, loaded.scorer, preset):
        if len(refs) and p.shape[-1] != len(loaded.classes):  # an export's program and metadata disagree
            raise CacheError(f"the exported model outputs {p.shape[-1]} probabilities for its "
                             f"{len(loaded.classes)} classes; damaged or crafted")
        for j, ref in enumerate(refs):
            probs[ref.shard, ref.key] = p[j].mean(axis=0)  # [K]: the average over views
            labels[ref.shard, ref.key] = ref.label
        for ref, _, reason in failures:
            source = inp.shards[ref.shard]
            if not isinstance(ref, End):
                failed.append((inp.row_name(source, ref.key), reason, ref.key))
                continue
            if ref.error:
                failed.append((inp.row_name(source, ""), ref.error, ""))
            ended[ref.shard] = ended.get(ref.shard, 0) + 1
            if progress and ended[ref.shard] == ref.readers:
                progress("predict", sum(ended[i] == ref.readers for i in ended), len(inp.shards))
    keep = sorted(probs, key=lambda k: (k[0], encode_path(k[1])))
    failed.sort()
    return Scored([inp.row_name(inp.shards[i], key) for i, key in keep], [labels[k] for k in keep],
                  np.array([probs[k] for k in keep]).reshape(-1, len(loaded.classes)),
                  [(name, reason) for name, reason, _ in failed], [], np.arange(len(keep)),
                  [key for _, key in keep], [key for _, _, key in failed], [inp.shards[i] for i, _ in keep])
