"""New input -> its features, cached like the training side -> the head -> CSV rows and a Kaggle submission.

An input is anything extract takes: a folder, or tar shards (a .tar, a brace pattern, a listing, a URL). The first
`predict` on it extracts its features into a cache through extract itself (the same kind of file, crash safety,
incremental adds, done markers per shard); later ones, with any head trained on the same features, run no backbone:
extract's plan, decided read-only (extract.plan.pending), says there is nothing to read."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backbone import Preset, random_weights_note
from ..cache import encode_path
from ..cache.format import CAT_DOG
from ..errors import CacheError, InputError
from ..extract.config import Progress
from ..extract.forward import run_dataset, run_features
from ..files import check_outputs, printable
from ..fit import DEFAULT_HEAD, log_loss
from ..fit.calibration import clip_probs, worst_rows
from ..fit.head import is_cat_dog
from ..sources.folder import Discovery
from .features import cached_features, default_cache, scoring_caches
from .inputs import ScoreInput, folder_samples, score_input
from .outputs import (
    check_submission,
    kaggle_id,
    key_ids,
    submission_ids,
    write_predictions,
    write_submission,
)
from .report import ClassReport, class_report
from .rows import Scored, onto_head_classes, score_cached, tta_views
from .scorer import Loaded, load_exported, load_scorer


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
    cache: list[Path | str] | None = None  # where the input's features are cached (a store's: its URL; None
    # with --model)
    extracted: int = 0  # images that went through the backbone in this run
    neutral: list[str] = field(default_factory=list)  # files given 0.5 in the submission (could not be predicted)
    classes: list[str] = field(default_factory=lambda: list(CAT_DOG))  # the head's classes
    weights_note: str = ""  # backbone.random_weights_note of the head's features
    confusion_plot: Path | None = None  # a labeled input scored by a K-class head (not cat/dog): its confusion matrix

    @property
    def report(self) -> ClassReport | None:
        """Per-class precision, recall, F1 and support on the input's labels; None for an unlabeled input."""
        if not any(y >= 0 for y in self.labels):
            return None
        at = {c: i for i, c in enumerate(self.classes)}
        return class_report(self.labels, [at[r[-1]] for r in self.rows], self.classes)

    @property
    def accuracy(self) -> float | None:
        known = [(r[-1], y) for r, y in zip(self.rows, self.labels, strict=True) if y >= 0]
        return sum(lab == self.classes[y] for lab, y in known) / len(known) if known else None

    @property
    def log_loss(self) -> float | None:
        known = [(r[1:-1], y) for r, y in zip(self.rows, self.labels, strict=True) if y >= 0]
        return log_loss(np.array([p for p, _ in known]), np.array([y for _, y in known])) if known else None

    @property
    def worst(self) -> list[dict[str, object]]:
        """The labeled images with the highest log loss (calibration.worst_rows), worst first."""
        known = [(r, y) for r, y in zip(self.rows, self.labels, strict=True) if y >= 0]
        return worst_rows([r[0] for r, _ in known], np.array([r[1:-1] for r, _ in known], np.float64).reshape(
            len(known), len(self.classes)), np.array([y for _, y in known], np.int64), self.classes)


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
    if model_path and cache:  # before a store cache's download
        raise InputError("--cache and --model: an exported model reads images, not caches; drop --cache")
    caches, stores = scoring_caches(cache, os.fspath(data_dir))  # a store URL: its local copy, only read
    confusion_path = confusion_plot_path(out)
    check_outputs({"--out": out, "--submission": submission, "the confusion matrix": confusion_path},
                  {"--head": head_path, "--model": Path(model_path) if model_path else None,
                   **{f"--cache {c}": c for c in caches}})
    inp = score_input(data_dir)
    disc = None if inp.tars else folder_samples(inp)  # a folder's one walk, passed along from here
    loaded = load_exported(model_path) if model_path else load_scorer(head_path, weights_file, backbone=False)
    named = model_path or head_path  # the file the classes came from, for the refusals
    if submission:
        check_submission(loaded.classes, named)
    ids = submission_ids(disc) if submission and disc else None  # before any forward pass
    if disc:
        onto_head_classes(disc, loaded.classes, named)
    views = _check_tta(loaded, tta)
    if model_path:
        scored = _score_tar_images(loaded, inp, views, device, batch_size, workers, progress) if inp.tars else \
            _score_images(loaded, disc, views, device, batch_size, workers, progress)
        used, extracted = None, 0
    else:
        planned = caches or [default_cache(loaded, head_path, inp, i) for i in range(len(loaded.members))]
        check_outputs({"--out": out, "--submission": submission, "the confusion matrix": confusion_path},
                      {f"the feature cache {c}": c for c in planned})
        used, extracted = cached_features(loaded, head_path, inp, planned, device, batch_size, workers,
                                          progress, "predict", explicit=bool(caches), stores=stores)
        scored = score_cached(loaded, used, inp, tta)
    if submission and inp.tars:  # a shard's keys are known once it is read: checked after extraction (cached)
        ids = key_ids(list(zip(scored.keys + scored.failed_keys, scored.rels + [f for f, _ in scored.failed],
                               strict=True)))
    if not scored.rels:
        first = f"; first failure: {scored.failed[0][0]!r}: {scored.failed[0][1]}" if scored.failed else ""
        raise InputError(f"no image in {printable(inp.spec)} could be predicted{first}")
    # the first of equal probabilities wins (argmax): cat on a 0.5 tie, as before K classes
    # the head's P(dog) clip (fit --calibrate) applies to the CSV as to the submission: the log loss said is theirs
    rows = [(rel, *map(float, p), loaded.classes[int(np.argmax(p))])
            for rel, p in zip(scored.rels, clip_probs(scored.probs, loaded.clip), strict=True)]
    neutral: list[str] = []
    main = os.environ.get("RANK", "0") == "0"  # under torchrun every rank extracts a share; rank 0 alone writes
    if submission and ids is not None:
        predicted = {kaggle_id(key): r[2] for key, r in zip(scored.keys or scored.rels, rows, strict=True)}
        neutral = [rel for i, rel in sorted(ids.items()) if i not in predicted]
        if main:
            write_submission(submission, {i: predicted.get(i, 0.5) for i in ids}, loaded.clip)
    if main:
        write_predictions(out, rows, scored.labels, loaded.classes)
    report = PredictReport(out, rows, scored.labels, scored.failed, disc.skipped if disc else [], submission,
                           time.perf_counter() - t0, views, [stores.get(c, c) for c in used] if used else None,
                           extracted, neutral, loaded.classes,
                           random_weights_note([p.weights for p, _ in loaded.members] or [loaded.provenance.weights]))
    if main:
        report.confusion_plot = draw_confusion(report, confusion_path, f"{Path(inp.spec.rstrip('/')).name} scored "
                                               f"by {Path(named).name}")
    report.seconds = time.perf_counter() - t0
    return report


def confusion_plot_path(out: Path) -> Path:
    """predictions.csv -> predictions.confusion.png, beside it (as fit's beside the head)."""
    return out.with_name(out.stem + ".confusion.png")


def draw_confusion(r: PredictReport, path: Path, what: str) -> Path | None:
    """The confusion matrix of a labeled input, drawn as fit draws its validation's: for K-class heads (a cat/dog
    head's 2 x 2 table says it all). A picture of an earlier predict to the same --out that this one does not redraw
    is removed: it would read as this run's."""
    report = r.report
    if report is None or is_cat_dog(r.classes):
        if path.is_file() or path.is_symlink():
            with contextlib.suppress(OSError):  # a picture left behind is no reason to fail the predict
                path.unlink()
        return None
    from ..plots import confusion_matrix

    return confusion_matrix(report.confusion, report.classes, path,
                            title=f"{report.n:,} labeled images of {what}")


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
    (tars.TarSamples); `.cls` indexes the model's classes. Rows in the order the cache route gives: shards as
    listed, samples by key."""
    from ..extract.tar_units import default_tar_workers
    from ..sources.spec import Identity, identity
    from ..sources.tars import End, TarSamples

    assert inp.shards is not None
    cfg = loaded.config(device, batch_size, workers, views=views)
    cfg.check()
    preset = Preset.from_spec(loaded.provenance.transform)  # the export's own record, not today's plugin
    dataset = TarSamples(inp.shards, cfg.views, preset, cfg.decoder, tuple(loaded.classes))

    def size(source: str) -> Identity:
        try:
            return identity(source)
        except OSError:
            return Identity(-1, "")

    n_workers = cfg.workers if cfg.workers >= 0 else default_tar_workers([size(s) for s in inp.shards], cfg.device)
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

