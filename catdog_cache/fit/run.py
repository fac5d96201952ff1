"""fit(): load, split (or cross-fit), train, evaluate, calibrate, save the head and its curve."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbone import random_weights_note
from ..cache.format import Provenance
from ..errors import CacheError, InputError
from ..extract.config import Progress
from ..files import as_paths, check_outputs, file_key
from ..score.report import ClassReport, from_confusion
from .batches import feature_rows
from .calibration import calibrate, clip_probs, log_loss, worst_rows
from .config import NOTE_WINDOW, Diverged, EpochStats, FitConfig, default_head_path, still_falling
from .crossfit import cross_fit
from .data import available_memory, load, parse_size
from .head import is_cat_dog, save_head
from .loop import evaluate, overfit, train, training_device
from .splits import split
from .valfolder import ValFolder, WithValidation, val_features


@dataclass
class FitReport:
    head_path: Path
    history: list[EpochStats]
    n_train: int
    n_val: int
    seconds: float
    load_seconds: float
    val_log_loss: float = float("nan")
    val_acc: float = float("nan")
    confusion: list[list[int]] = field(default_factory=list)  # K x K, rows: true class, cols: predicted class
    streamed: bool = False
    calibration: dict[str, float] = field(default_factory=dict)
    curve: Path | None = None
    kept_epoch: int = 0
    head_shape: str = ""
    folds: dict[str, Any] = field(default_factory=dict)  # --folds: K, each fold's best epoch, the final epochs
    missing: list[str] = field(default_factory=list)  # ensemble: images in only some of the caches
    unlabeled: int = 0  # rows without a label, not used
    sources: list[str] = field(default_factory=list)  # the folders whose labeled images it trained on
    overfit: dict[str, float] = field(default_factory=dict)  # the kept epoch clearly worse than the best (loop.overfit)
    fold_curve: Path | None = None  # --folds: each fold's held-out curve
    reliability: Path | None = None  # --calibrate: the reliability diagram
    confusion_plot: Path | None = None  # K classes (not cat/dog) with a validation split: the confusion matrix
    classes: list[str] = field(default_factory=lambda: ["cat", "dog"])  # the head's outputs, in order
    weights_note: str = ""  # backbone.random_weights_note of the features trained on
    val: dict[str, Any] = field(default_factory=dict)  # --val DIR: the folder, its rows, caches, extracted, failed

    @property
    def report(self) -> ClassReport | None:
        """Per-class precision, recall, F1 and support of the validation (or out-of-fold) predictions."""
        return from_confusion(self.confusion, self.classes) if self.n_val else None
    falling: dict[str, Any] = field(default_factory=dict)  # the curve still going down at the end (still_falling)
    worst: list[dict[str, Any]] = field(default_factory=list)  # calibration.worst_rows of the validation predictions

    @property
    def per_class_acc(self) -> list[float]:
        return [row[i] / sum(row) if sum(row) else float("nan") for i, row in enumerate(self.confusion)]

    @property
    def falling_note(self) -> str:
        """One sentence when the loss was still falling over the last epochs (the head may be underfit), else ""."""
        f = self.falling
        if not f:
            return ""
        what, drop, w, n = f["what"], f["drop"], f["window"], f["epochs"]
        said = (f"the {what} log loss was still falling at the end: {drop:.1%} lower in the last {w} of {n} epochs "
                f"than before them")
        if what == "training":  # no validation rows: more epochs may fit noise as well as signal
            return said + (f"; without a validation split that need not mean underfit: --val-fraction or --folds "
                           f"would stop it when it stops helping, or try --epochs {2 * n}")
        return said + f"; the head may be underfit: try --epochs {2 * n}"

    @property
    def overfit_note(self) -> str:
        """One sentence for the user when the kept head is clearly past its best epoch, else "". It suggests, and
        does not promise: on 80-100 validation images the lowest epoch is itself noisy, and on held-out photos
        --keep best measured no better than the last epoch (README, "Keeping the best epoch")."""
        o = self.overfit
        if not o:
            return ""
        best, epoch = int(o["best_epoch"]), int(o["kept_epoch"])
        if self.folds:
            return (f"held-out log loss (mean of {self.folds['folds']} folds) was lowest at epoch {best} "
                    f"({o['best']:.4f}) and is {o['kept']:.4f} at epoch {epoch}, the final head's: it may be "
                    f"overfitting; try --keep best (the final head then trains for the folds' median best epoch) or "
                    f"--epochs {best}, and compare on images it never saw")
        return (f"validation log loss was lowest at epoch {best} ({o['best']:.4f}) and is {o['kept']:.4f} at the kept "
                f"epoch {epoch}: the head may be overfitting; try --keep best (keeps epoch {best}) or --epochs {best}, "
                f"and compare on images it never saw (--folds 5 gives a steadier estimate than one split)")


def check_replace(head_path: Path, provenances: list[str], caches: list[Path]) -> None:
    """Refitting a head on the same features replaces it (the usual loop); a head of other features, or a file that
    is no head, is someone's work: refused unless --overwrite."""
    from ..cache import Provenance
    from ..errors import CatdogError
    from .head import load_head

    if not head_path.exists():
        return
    try:
        _, meta = load_head(head_path)
        old = meta.get("ensemble") or [meta.get("provenance")]
        old_provs = [Provenance.from_json(p, f"head {head_path}") for p in old]
    except CatdogError:
        raise InputError(f"--head {head_path} exists and is not a head fit can read: give another --head, or "
                         "--overwrite to replace it") from None
    new_provs = [Provenance.from_json(p) for p in provenances]
    old_caches = meta.get("caches") or [meta.get("cache")]
    new_caches = [str(c.resolve()) for c in caches]
    # the same caches: the same paths, or the same file names (a project folder moved or copied keeps its heads)
    if old_provs == new_provs and len(old_caches) == len(new_caches) and all(
            isinstance(o, str) and (o == n or Path(o).name == Path(n).name)
            for o, n in zip(old_caches, new_caches, strict=True)):
        return

    other = default_head_path(caches[0])
    suggest = f" (e.g. {other})" if other.resolve() != head_path.resolve() else ""

    def what(provs: list[Provenance], where: list) -> str:
        feats = " + ".join(f"{p.arch} {p.layer} ({p.weights})" for p in provs)
        return f"{feats} features of {', '.join(str(c) for c in where)}"

    raise InputError(f"--head {head_path} holds a head trained on {what(old_provs, old_caches)}; this fit trains on "
                     f"{what(new_provs, new_caches)}: give another --head{suggest}, or --overwrite to replace it")


def fit(cache: str | os.PathLike[str] | list, head_path: str | os.PathLike[str] | None, cfg: FitConfig,
        on_epoch: Callable[[EpochStats], None] | None = None, max_memory: str | None = None,
        calibrate_head: bool = False, curve: bool = True, folds: int = 0,
        on_fold: Callable[[int, float, float], None] | None = None, budget_bytes: int | None = None,
        device: str | torch.device = "auto", overwrite: bool = False,
        val: str | os.PathLike[str] | None = None, val_cache: str | os.PathLike[str] | list | None = None,
        progress: Progress | None = None) -> FitReport:
    """Train on the cache: in memory when the feature matrix fits the budget (default: half the available memory),
    streamed from HDF5 otherwise; the same batches, hence the same head, either way. Several caches: one head on
    their features side by side (an ensemble of backbones or layers). folds=K: out-of-fold metrics and calibration,
    then the head is trained on every labeled row. An existing head trained on other features (other provenance or
    other caches) is only replaced with overwrite=True.
    device: auto (CUDA when available) | cpu | cuda[:N]; see training_device. An argument, not a FitConfig field:
    like the memory budget it decides how fast, not which head (up to float rounding), so heads do not record it.
    val: a labeled folder scored as the validation set instead of the hash split (valfolder.val_features: its
    features cached beside the head, or at val_cache, extracted with progress when missing)."""
    cfg.check()
    on = training_device(device)  # before any work: --device cuda without CUDA is one line
    caches = as_paths(cache)
    if len(set(map(file_key, caches))) != len(caches):  # (st_dev, st_ino): hard and symbolic links are the same file
        raise InputError("--cache: the same cache given twice")
    if folds and not 2 <= folds <= 50:
        raise InputError(f"--folds must be between 2 and 50, got {folds}")
    if val is not None and folds:
        raise InputError("--val and --folds: each is a validation scheme; give one")
    val_caches = as_paths(val_cache)
    if val is not None:
        cfg = replace(cfg, val_fraction=0.0)  # the folder replaces the hash split (the head records no split)
    head_path = Path(head_path) if head_path else default_head_path(caches[0])
    curve_path = head_path.with_suffix(".png") if curve else None
    fold_path = head_path.with_name(head_path.stem + ".folds.png") if curve and folds else None
    reliability_path = head_path.with_name(head_path.stem + ".reliability.png") if curve and calibrate_head else None
    confusion_path = head_path.with_name(head_path.stem + ".confusion.png") if curve else None  # if K classes
    check_outputs({"--head": head_path, "the training curve": curve_path, "the fold curves": fold_path,
                   "the reliability diagram": reliability_path, "the confusion matrix": confusion_path},
                  {**{f"--cache {c}": c for c in caches}, **{f"--val-cache {c}": c for c in val_caches}})
    # budget_bytes: an exact budget for verify and tests (below --max-memory's 1M floor: always streamed)
    budget = budget_bytes or (parse_size(max_memory) if max_memory else available_memory() // 2)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:  # cache handles stay open while streaming
        data = load(caches, cfg, budget, stack, on, strict_budget=bool(max_memory) and not budget_bytes)
        if not overwrite:
            check_replace(head_path, data.provenances, caches)
        vf = None if val is None else val_features(
            val, caches, data.provenances, data.weights_paths, list(data.classes), data.sources, head_path,
            val_caches or None, device if isinstance(device, str) else "auto", progress)
        load_seconds = time.perf_counter() - t0
        oof_note: dict[str, Any] = {}
        if folds:
            logits, y, best_epochs, fold_histories, scored_images = cross_fit(data, cfg, folds, on_fold, on)
            scored = [os.fsdecode(data.paths[i]) for i in scored_images]
            # the default epochs: as many as the folds trained before their out-of-fold loss stopped falling
            final_epochs = (int(np.median(best_epochs)) if cfg.keep == "best" else cfg.epochs
                            or len(fold_histories[0]))
            final_cfg = replace(cfg, val_fraction=0.0, keep="last", epochs=final_epochs)
            train_np = np.flatnonzero(data.raw_labels >= 0)
            train_rows = feature_rows(train_np, data.views)
            head, history, kept = train(data.features_of, data.labels, train_rows, torch.zeros(0, dtype=torch.long),
                                        final_cfg, on_epoch, data.dim, on, len(data.classes))
            n_train, n_val = len(train_np), len(y)
            oof_note = {"folds": folds, "best_epochs": best_epochs, "final_epochs": final_cfg.epochs}
            # the folds' mean held-out curve stands for the final head's (which has no validation rows)
            with np.errstate(all="ignore"):
                mean_curve = np.nanmean([[h.val_loss for h in f] for f in fold_histories], axis=0).tolist()
            too_far = overfit(mean_curve, final_cfg.epochs)
            falling = still_falling(mean_curve[:final_cfg.epochs], NOTE_WINDOW), "out-of-fold"
        else:
            train_np, val_np = split(data.paths, data.raw_labels, cfg.val_fraction, cfg.seed)
            # "lowest validation log loss" would name no validation (--val: val_fraction 0, every labeled row trains)
            if cfg.keep == "best" and len(val_np) == 0 and vf is None:
                raise InputError(f"--keep best picks the epoch with the lowest validation log loss, and --val-fraction "
                                 f"{cfg.val_fraction} leaves no validation image: raise --val-fraction, use --folds, "
                                 "or keep the last epoch")
            train_rows = feature_rows(train_np, data.views)
            val_rows = feature_rows(val_np, data.views, every_view=False)  # [n_val]
            features_of, labels = data.features_of, data.labels
            if vf is not None:
                features_of, labels, val_rows = with_val_folder(features_of, labels, vf, data.dim)
            head, history, kept = train(features_of, labels, train_rows, val_rows, cfg, on_epoch, data.dim,
                                        on, len(data.classes))
            _, _, logits = evaluate(head, features_of, labels, val_rows)
            y = labels[val_rows]
            scored = vf.paths if vf is not None else [os.fsdecode(data.paths[i]) for i in val_np]
            n_train, n_val = len(train_np), len(val_rows)
            too_far = overfit([h.val_loss for h in history], kept)
            watched = [h.val_loss for h in history] if len(val_rows) else [h.train_loss for h in history]
            falling = still_falling(watched, NOTE_WINDOW), "validation" if len(val_rows) else "training"
    probs = logits.softmax(1)
    y_val, pred = y.numpy(), probs.argmax(1).numpy()
    calibration = {"temperature": 1.0, "clip": 0.0}
    if calibrate_head:
        if len(y) < 2:
            raise InputError("--calibrate needs a validation split: raise --val-fraction (or use --folds)")
        calibration = calibrate(logits, y, clip_dog=is_cat_dog(data.classes))
    k = len(data.classes)
    confusion = np.zeros((k, k), np.int64)  # [true, predicted]
    np.add.at(confusion, (y_val, pred), 1)
    confusion = confusion.tolist()
    acc = float((pred == y_val).mean()) if len(y_val) else float("nan")
    report = FitReport(head_path, history, n_train, n_val, 0.0, load_seconds,
                       log_loss(probs.numpy(), y_val), acc, confusion,
                       streamed=data.streamed is not None, calibration=calibration if calibrate_head else {},
                       kept_epoch=kept, head_shape=head.describe(), folds=oof_note, missing=data.missing,
                       unlabeled=int((data.raw_labels < 0).sum()), sources=data.sources, overfit=too_far or {},
                       classes=list(data.classes),
                       weights_note=random_weights_note([Provenance.from_json(p).weights for p in data.provenances]),
                       val={**vf.meta(), "extracted": vf.extracted, "failed": vf.failed, "unlabeled": vf.unlabeled}
                       if vf else {},
                       falling={"what": falling[1], "drop": falling[0][0], "window": falling[0][1],
                                "epochs": len(history)} if falling[0] else {},
                       worst=worst_rows(scored,
                                        clip_probs((logits / calibration["temperature"]).softmax(1).numpy(),
                                                   calibration["clip"]), y_val, list(data.classes)))
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise Diverged("training produced NaN or infinite weights: lower --lr; no head saved")
    save_head(head_path, head, {
        "provenance": data.provenances[0],
        "ensemble": data.provenances if len(caches) > 1 else [],
        "config": {**asdict(cfg), "hidden": list(cfg.hidden)},
        "cache": str(caches[0].resolve()),
        "caches": [str(c.resolve()) for c in caches],
        "head": str(head_path.resolve()),  # where it was saved: predict finds that place's test features again
        "sources": data.sources,
        "classes": list(data.classes),
        "weights_path": data.weights_paths[0],
        "weights_paths": data.weights_paths,
        "history": [asdict(h) for h in history],
        "kept_epoch": kept,
        "metrics": {"val_log_loss": report.val_log_loss, "val_acc": report.val_acc, "confusion": confusion,
                    "n_train": report.n_train, "n_val": report.n_val, **oof_note},
        "val": vf.meta() if vf else None,
        "temperature": calibration["temperature"],
        "clip": calibration["clip"],
    })
    if curve_path:
        from ..plots import confusion_matrix, fold_curves, reliability_diagram, training_curve

        cat_dog = is_cat_dog(data.classes)
        if cat_dog or not len(y_val):  # cat/dog: the report's 2 x 2 table says it all, and its files stay as they were
            confusion_path = None
        # pictures of an earlier fit to this head that this one does not redraw would read as this head's
        for kind, drawn in ((".folds.png", fold_path), (".reliability.png", reliability_path),
                            (".confusion.png", confusion_path)):
            old = head_path.with_name(head_path.stem + kind)
            if drawn is None and (old.is_file() or old.is_symlink()):
                with contextlib.suppress(OSError):  # a picture left behind is no reason to fail the fit
                    old.unlink()

        report.curve = training_curve(history, curve_path, kept_epoch=kept)
        if fold_path:
            report.fold_curve = fold_curves(fold_histories, fold_path, final_epochs=oof_note["final_epochs"])
        where = "out-of-fold" if folds else "validation"
        if reliability_path:
            what = ("P(dog)", "share of dogs") if cat_dog else ("top-class probability", "share right")
            report.reliability = reliability_diagram(
                _reliability_curves(logits, calibration, cat_dog), y_val if cat_dog else y_val == pred,
                reliability_path, title=f"reliability of {what[0]} on {len(y_val):,} {where} predictions", what=what)
        if confusion_path:
            report.confusion_plot = confusion_matrix(confusion, data.classes, confusion_path,
                                                     title=f"{len(y_val):,} {where} predictions of {head.describe()}")
    report.seconds = time.perf_counter() - t0
    return report


def with_val_folder(features_of: Any, labels: torch.Tensor, vf: ValFolder, dim: int
                    ) -> tuple[WithValidation, torch.Tensor, torch.Tensor]:
    """The validation folder's rows after the training rows: (features, labels [N + n_val], validation rows)."""
    if vf.x.shape[1] != dim:  # the same provenance makes the same width: only a damaged cache differs
        raise CacheError(f"--val: the features of {vf.folder} in {', '.join(map(str, vf.caches))} are "
                         f"{vf.x.shape[1]}-d, the training cache's {dim}-d; delete them and run again")
    offset = len(labels)
    return (WithValidation(features_of, vf.x, offset), torch.cat([labels, vf.labels]),
            torch.arange(offset, offset + len(vf.labels)))


def _reliability_curves(logits: torch.Tensor, calibration: dict[str, float], cat_dog: bool = True
                        ) -> dict[str, np.ndarray]:
    """P(dog) as trained and, when calibration changed it, after temperature and clip (what predict writes). For K
    classes, the probability of the predicted class (top-label reliability: observed = whether it was right);
    temperature never changes which class is on top."""
    def of(p: torch.Tensor) -> np.ndarray:
        return (p[:, 1] if cat_dog else p.max(1).values).numpy()

    curves = {"as trained": of(logits.softmax(1))}  # logits [n, K]
    t, clip = calibration["temperature"], calibration["clip"]
    if t != 1.0 or clip:
        p = of((logits / t).softmax(1))
        curves[f"calibrated (T {t:.2f}, clip {clip:g})" if cat_dog else f"calibrated (T {t:.2f})"] = np.clip(
            p, clip, 1 - clip)
    return curves
