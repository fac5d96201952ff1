"""`catdog-cache fit`: train the head on cached features; the epoch table, confusion and calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from ..files import printable
from ..store.url import cache_arg
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
    cache: list[Path] = typer.Option([Path("cache/features.h5")], "--cache", metavar="PATH", parser=cache_arg,
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
    val: Path | None = typer.Option(None, "--val", metavar="DIR", help="A labeled folder (one sub-folder per "
                                    "class) scored as the validation set instead of the --val-fraction split; its "
                                    "features are cached beside the head, as predict caches a folder's."),
    val_cache: list[Path] | None = typer.Option(None, "--val-cache", metavar="PATH", show_default="beside the head",
                                                parser=cache_arg,
                                                help="Where --val's features are cached; once per --cache."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Train the head (Dropout -> Linear(D, 2), or an MLP with --hidden) on the cached features."""
    from ..fit import FitConfig, default_head_path
    from ..store.staging import readable_cache
    from ..store.url import StoreURL, check_location
    from .precheck import caches_readable

    given = [check_location(c) for c in cache]
    urls = [c for c in given if isinstance(c, StoreURL)]
    if head is None and urls:
        raise InputError(f"fit --cache {urls[0]}: give --head PATH (a local file): the head is not written to the "
                         "store")

    for v in val_cache or []:
        if isinstance(check_location(v), StoreURL):  # the folder's features are written there: a local file
            raise InputError(f"fit --val-cache {printable(str(v))}: give a local path (or leave --val-cache out: "
                             "the validation features go beside the head)")
    cfg = FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed, augment, hidden_sizes(hidden), keep,
                    weight_decay)
    cfg.check()  # options and files before torch's import: mistakes answered at once
    cache = [readable_cache(c) for c in given]  # a store URL: its local copy, read as a local cache
    caches_readable(cache)
    if val is not None and not val.is_dir():
        raise InputError(f"--val {printable(str(val))}: folder not found")
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
                on_fold=on_fold, device=device, overwrite=overwrite, val=val, val_cache=val_cache, progress=bar)
    if r.weights_note and not (as_json or quiet):  # --json says it as "random_weights"; -q: the summary alone
        err.print(f"[yellow]note:[/] {escape(r.weights_note)}", highlight=False)
    if r.unlabeled and not as_json:
        err.print(f"note: {plural(r.unlabeled, 'unlabeled row')} in the cache, not used for training", highlight=False)
    if r.missing and not as_json:
        err.print(f"[yellow]warning:[/] {plural(len(r.missing), 'image')} in only some of the caches, left out: "
                  f"{escape(printable(', '.join(r.missing[:5])))}" + (" …" if len(r.missing) > 5 else ""),
                  highlight=False)
    if r.val.get("failed") and not as_json:
        err.print(f"[yellow]warning:[/] --val: {plural(r.val['failed'], 'image')} could not be decoded, not scored "
                  f"(catdog-cache info {escape(printable(r.val['caches'][0]))} --failures lists them)", highlight=False)
    if r.val.get("unlabeled") and not as_json:
        err.print(f"note: --val: {plural(r.val['unlabeled'], 'image')} outside the class folders, not scored",
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
                     "report": r.report.to_json() if r.report else None, "val": r.val or None,
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
    if r.val:  # --val DIR: say which folder the numbers are on, and where its features are
        val += (f" on {plural(r.n_val, 'image')} of {escape(printable(r.val['folder']))} (features "
                f"{'cached in' if r.val['extracted'] else 'read from'} "
                f"{escape(printable(', '.join(r.val['caches'])))}, {r.val['extracted']:,} extracted now)")
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


def confusion_table(r, folds: int) -> Table:
    """K x K: rows the true class, columns the predicted one, and each class's precision, recall (its accuracy), F1
    and support (cli.report)."""
    from .report import report_table

    return report_table(r.report, f"{'out-of-fold' if folds else 'validation'}: {plural(r.n_val, 'image')}")
