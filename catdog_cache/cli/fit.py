"""`catdog-cache fit`: train the head on cached features; the epoch table, confusion and calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..files import printable
from .common import (
    BATCH,
    DROPOUT,
    EPOCHS,
    HEAD,
    HIDDEN,
    JSON,
    LR,
    QUIET,
    SEED,
    VAL_FRACTION,
    Bar,
    app,
    err,
    first_few,
    fmt_number,
    guarded,
    hidden_sizes,
    out,
    plural,
    source_noun,
    to_json,
    worst_line,
)


@app.command("fit")
@guarded
def fit_cmd(
    cache: list[Path] = typer.Option([Path("cache/features.h5")], "--cache", metavar="PATH",
                                     help="HDF5 feature cache; give it "
                                     "again for an ensemble (one head on the features of several caches, joined "
                                     "by file)."),
    head: Path | None = HEAD,
    epochs: int | None = EPOCHS,
    batch_size: int = BATCH,
    lr: float = LR,
    dropout: float = DROPOUT,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    hidden: str = HIDDEN,
    keep: str = typer.Option("last", "--keep", help="last | best (the epoch with the lowest validation log loss)."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget, e.g. 2G: the features, the "
                                          "index and the per-row arrays; larger caches are streamed from disk "
                                          "(default: half the available memory). The head is the same either way."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Fit temperature and a P(dog) clip on validation."),
    augment: bool = typer.Option(False, "--augment", help="Train on every cached view (extract --views center,flip)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="L2 penalty on the head's weights (Adam's "
                                       "weight_decay: grad += W * weight)."),
    folds: int = typer.Option(0, "--folds", help="K-fold cross-fitting: out-of-fold accuracy and log loss (and "
                              "--calibrate on them), then the head is trained on every labeled image."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda: where the head trains (auto: CUDA when "
                               "available). The head is the CPU's up to float rounding."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --head trained on other features "
                                   "(refitting on the same caches replaces it anyway)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Train the head (Dropout -> Linear(D, 2), or an MLP with --hidden) on the cached features."""
    from ..fit import FitConfig, default_head_path
    from .precheck import caches_readable

    cfg = FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed, augment, hidden_sizes(hidden), keep,
                    weight_decay)
    cfg.check()  # options and files before torch's import: mistakes answered at once
    caches_readable(cache)
    from ..fit import fit

    table = Table("epoch", "train loss", "train acc", "val loss", "val acc", "s", title="fit")

    bar = Bar(quiet or as_json)  # in logs: a line with the rate and ETA every Bar.log_seconds

    def on_epoch(s: Any) -> None:
        bar("fit", s.epoch, epochs or s.planned)
        table.add_row(str(s.epoch), f"{s.train_loss:.4f}", f"{s.train_acc:.3f}", fmt_number(s.val_loss),
                      fmt_number(s.val_acc, 3), f"{s.seconds:.2f}")

    head = head or default_head_path(cache[0])
    fold_rows: list[str] = []

    def on_fold(k: int, loss: float, acc: float) -> None:
        fold_rows.append(f"fold {k}/{folds}: held-out log loss {loss:.4f}, accuracy {acc:.4f}")
        if not (quiet or as_json):
            err.print(fold_rows[-1], highlight=False)

    with bar:
        r = fit(cache if len(cache) > 1 else cache[0], head, cfg, on_epoch, max_memory, calibrate, folds=folds,
                on_fold=on_fold, device=device, overwrite=overwrite)
    if r.weights_note and not (as_json or quiet):  # --json says it as "random_weights"; -q: the summary alone
        err.print(f"[yellow]note:[/] {escape(r.weights_note)}", highlight=False)
    if r.unlabeled and not as_json:
        err.print(f"note: {plural(r.unlabeled, 'unlabeled row')} in the cache, not used for training", highlight=False)
    if r.missing and not as_json:
        err.print(f"[yellow]warning:[/] {plural(len(r.missing), 'image')} in only some of the caches, left out: "
                  f"{escape(printable(', '.join(r.missing[:5])))}" + (" …" if len(r.missing) > 5 else ""),
                  highlight=False)
    if as_json:
        print(to_json({"head": str(head), "seconds": r.seconds, "n_train": r.n_train, "n_val": r.n_val,
                     "val_acc": r.val_acc, "val_log_loss": r.val_log_loss, "confusion": r.confusion,
                     "classes": r.classes, "per_class_acc": dict(zip(r.classes, r.per_class_acc, strict=True)),
                     "calibration": r.calibration, "curve": str(r.curve) if r.curve else None,
                     "kept_epoch": r.kept_epoch, "head_shape": r.head_shape, "folds": r.folds,
                     "overfit": r.overfit or None, "fold_curve": str(r.fold_curve) if r.fold_curve else None,
                     "reliability": str(r.reliability) if r.reliability else None,
                     "confusion_plot": str(r.confusion_plot) if r.confusion_plot else None,
                     "missing": r.missing, "sources": r.sources, "random_weights": bool(r.weights_note),
                     "still_falling": r.falling or None, "worst": r.worst,
                     "history": [h.row() for h in r.history]}))
        return
    if not quiet:
        out.print(table)
        if r.n_val:
            out.print(confusion_table(r, folds))
        if r.worst:
            print_worst(r.worst, "out-of-fold" if folds else "validation", bool(r.calibration))
        if r.calibration:
            c = r.calibration
            bound = (" (at the edge of its range 0.05-20: the validation set is too easy or too small to calibrate)"
                     if c.get("clamped") else "")
            where = (f"out-of-fold predictions of {plural(r.n_val, 'image')} (two numbers fitted on them: nearly "
                     "unbiased)" if folds else "the validation split they are scored on, so optimistic")
            floor = f" (the floor 1/(n+2) of {r.n_val:,} predictions)" if c.get("floor") == c["clip"] else ""
            clip = (f", clip {c['clip']:.3g}{floor}", f" -> {c['log_loss_after']:.4f} (clip)") \
                if r.classes == ["cat", "dog"] \
                else ("", "")  # the P(dog) clip is the Kaggle Redux trick: cat/dog heads only
            out.print(f"calibrated: temperature {c['temperature']:.3f}{bound}{clip[0]}; "
                      f"log loss {c['log_loss_before']:.4f} -> {c['log_loss_temperature']:.4f} (temperature)"
                      f"{clip[1]}; fitted on {where}")
        if r.curve:
            out.print(f"training curve: {escape(str(r.curve))}", highlight=False)
        if r.fold_curve:
            out.print(f"fold curves: {escape(str(r.fold_curve))}", highlight=False)
        if r.reliability:
            out.print(f"reliability diagram: {escape(str(r.reliability))}", highlight=False)
        if r.confusion_plot:
            out.print(f"confusion matrix: {escape(str(r.confusion_plot))}", highlight=False)
    mode = " (streamed from disk)" if r.streamed else ""
    kept = f", kept epoch {r.kept_epoch} (lowest validation log loss)" if keep == "best" and not folds else ""
    val = (f"validation accuracy {r.val_acc:.4f}, log loss {r.val_log_loss:.4f}" if r.n_val
           else "no validation split")
    if folds:
        val = (f"{folds}-fold out-of-fold accuracy {r.val_acc:.4f}, log loss {r.val_log_loss:.4f}; final head on all "
               f"{r.n_train:,} labeled images for {r.folds['final_epochs']} epochs")
    if r.calibration:  # the number a Kaggle submission scores, kept under --quiet
        val += f" ({r.calibration['log_loss_after']:.4f} calibrated)"
    folders = r.sources[0] if len(r.sources) == 1 else f"{source_noun(r.sources)}: {first_few(r.sources)}"
    out.print(f"[green]fit[/] {r.head_shape} on {plural(r.n_train, 'train row')} from "
              f"{escape(printable(folders))}{mode}, "
              f"{plural(len(r.history), 'epoch')} in {r.seconds:.2f}s (load {r.load_seconds:.2f}s){kept}: {val} -> "
              f"{escape(printable(str(head)))}", highlight=False)
    if r.falling_note:
        err.print(f"[yellow]note:[/] {escape(r.falling_note)}", highlight=False)
    if r.overfit_note:  # after the summary line, so it is the last thing read
        err.print(f"[yellow]warning:[/] {escape(r.overfit_note)}", highlight=False)



def print_worst(worst: list[dict[str, Any]], where: str, calibrated: bool) -> None:
    """The images that cost the most log loss, worst first: a mislabeled file is usually the first."""
    out.print(f"worst-scored {where} images ({'calibrated ' if calibrated else ''}probabilities):", highlight=False)
    for w in worst:
        out.print(worst_line(w), highlight=False)


MAX_TABLE_CLASSES = 20  # a wider confusion matrix does not fit a terminal: --json has it whole


def confusion_table(r, folds: int) -> Table:
    """K x K: rows the true class, columns the predicted one, and each class's accuracy (the diagonal share)."""
    names = [escape(printable(c))[:12] for c in r.classes]
    acc = [f"{a:.3f}" if a == a else "no images" for a in r.per_class_acc]  # nan: class absent
    title = f"{'out-of-fold' if folds else 'validation'}: {plural(r.n_val, 'image')}"
    if len(names) > MAX_TABLE_CLASSES:
        t = Table("class", "images", "class accuracy", title=f"{title} (the confusion matrix is in --json)")
        for name, row, a in zip(names, r.confusion, acc, strict=True):
            t.add_row(name, str(sum(row)), a)
        return t
    t = Table("true \\ predicted", *names, "class accuracy", title=title)
    for name, row, a in zip(names, r.confusion, acc, strict=True):
        t.add_row(name, *map(str, row), a)
    return t
