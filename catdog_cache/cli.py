"""Thin typer CLI: parse options, call one core function, render with rich. Heavy imports (torch) stay inside the
commands so that `--help` is instant."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import CatdogError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache frozen VGG16 fc7 activations once in HDF5; train the Linear(4096, 2) head in seconds.")
out = Console()
err = Console(stderr=True)

CACHE = typer.Option(Path("cache/features.h5"), "--cache", help="HDF5 feature cache.")
HEAD = typer.Option(Path("cache/head.pt"), "--head", help="Trained head file.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
WORKERS = typer.Option(-1, "--workers", help="Decode workers (-1: sized to the cores).")
# Training options shared by fit and verify (verify must be able to train exactly as fit does).
LR = typer.Option(1e-3, "--lr", help="Adam learning rate.")
DROPOUT = typer.Option(0.5, "--dropout", help="Dropout probability before the Linear(4096, 2).")
VAL_FRACTION = typer.Option(0.2, "--val-fraction", help="Share of each class held out (hash of the path).")
SEED = typer.Option(0, "--seed", help="Seed for init, batch order, dropout masks and the split.")


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CatdogError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except OSError as e:  # disk full, read-only or missing location: the OS's words and the file
            where = f": {e.filename}" if e.filename else ""
            err.print(f"[bold red]error:[/] {escape(e.strerror or str(e))}{escape(str(where))}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class Bar:
    """Progress callback (stage, done, total) rendered as rich bars with images/s and ETA."""

    def __init__(self, quiet: bool = False) -> None:
        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("[cyan]{task.fields[rate]}"),
                                 TimeRemainingColumn(), console=err, disable=quiet, transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks or self.progress.tasks[self.tasks[stage]].total != total:
            self.tasks[stage] = self.progress.add_task(stage, total=total, rate="")
        task = self.tasks[stage]
        self.progress.update(task, completed=done, total=total)
        speed, unit = self.progress.tasks[task].speed, {"extract": "img/s", "hash": "files/s"}.get(stage)
        self.progress.update(task, rate=f"{speed:.1f} {unit}" if speed and unit else "")


def _json(obj: Any) -> str:
    """Strict JSON for scripts: NaN (e.g. no validation images of a class) becomes null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False)


def _print_skips(title: str, items: list[tuple[str, str]], limit: int = 10) -> None:
    if not items:
        return
    err.print(f"[yellow]{len(items)} {title}[/]")
    for rel, reason in items[:limit]:
        err.print(f"  [yellow]skip[/] {escape(repr(rel) if not rel.isprintable() else rel)}: {escape(reason)}",
                  highlight=False)
    if len(items) > limit:
        err.print(f"  … and {len(items) - limit} more (see `catdog-cache info`)")


@app.command()
@guarded
def extract(
    data_dir: Path = typer.Argument(..., help="Image folder: cat/ + dog/ sub-folders, cat.N.jpg files, or unlabeled."),
    cache: Path = CACHE,
    weights: str = typer.Option("imagenet", "--weights", help="imagenet | random | path to a VGG16 state dict."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights random."),
    device: str = DEVICE,
    batch_size: int = typer.Option(0, "--batch-size", help="Images per forward pass (0: 16 on CPU, 128 on GPU)."),
    workers: int = WORKERS,
    dtype: str = typer.Option("float32", "--dtype", help="Storage dtype: float32 | float16 (half the file)."),
    precision: str = typer.Option("fp32", "--precision", help="Backbone compute: fp32 | bf16 | fp16."),
    views: str = typer.Option("center", "--views", help="Comma-separated views per image: center, flip."),
    decoder: str = typer.Option("pil", "--decoder", help="pil (CPU workers) | torchvision (JPEGs decoded in "
                                "batches on the extraction device: nvJPEG on a GPU)."),
    prune: bool = typer.Option(False, "--prune", help="Remove rows of files no longer in the folder."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any file that cannot be used."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary."),
    arch: str = typer.Option("vgg16", "--arch", hidden=True, help="Test-only backbones."),
    part_rows: int = typer.Option(1024, "--part-rows", hidden=True, help="Rows per crash-safe part."),
) -> None:
    """Run the frozen VGG16 (up to fc7) over every image once and store the 4096-d features."""
    from .backbone import parse_weights
    from .extract import ExtractConfig
    from .extract import extract as run

    cfg = ExtractConfig(weights=parse_weights(weights, seed), arch=arch, device=device, batch_size=batch_size,
                        workers=workers, dtype=dtype, precision=precision,
                        views=tuple(v.strip() for v in views.split(",") if v.strip()), decoder=decoder,
                        part_rows=part_rows)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        run(data_dir, cache, cfg, prune=prune, strict=strict)
        return
    with Bar(quiet or as_json) as bar:
        r = run(data_dir, cache, cfg, progress=bar, prune=prune, strict=strict)
    if as_json:
        print(_json({"cache": str(cache), "rows": r.rows, "found": r.found, "extracted": r.extracted,
                          "reused": r.reused, "failed": r.failed, "skipped": r.skipped, "removed": r.removed,
                          "pruned": r.pruned, "seconds": r.seconds, "layout": r.layout, "warnings": r.warnings}))
        return
    for w in r.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    _print_skips("files skipped while scanning", r.skipped)
    _print_skips("files could not be decoded", r.failed)
    if r.removed:
        verb = "removed from the cache" if r.pruned else "are cached but gone from the folder (--prune removes them)"
        err.print(f"[yellow]{len(r.removed)} files {verb}[/]")
    rate = f" ({r.extracted / r.seconds:.1f} img/s)" if r.extracted else ""
    out.print(f"[green]extracted[/] {r.extracted} new, reused {r.reused}, failed {len(r.failed)} -> "
              f"{r.rows} rows in {escape(str(cache))} in {r.seconds:.1f}s{rate}", highlight=False)


@app.command()
@guarded
def fit(
    cache: Path = CACHE,
    head: Path = HEAD,
    epochs: int = typer.Option(20, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = LR,
    dropout: float = DROPOUT,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    max_memory: str | None = typer.Option(None, "--max-memory", help="Feature memory budget, e.g. 2G; larger "
                                          "caches are streamed from disk (default: half the available memory)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Fit temperature and a P(dog) clip on validation."),
    augment: bool = typer.Option(False, "--augment", help="Train on every cached view (extract --views center,flip)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary instead of tables."),
) -> None:
    """Train Dropout -> Linear(4096, 2) on the cached features (CrossEntropy, Adam)."""
    from .fit import FitConfig
    from .fit import fit as run

    table = Table("epoch", "train loss", "train acc", "val loss", "val acc", "s", title="fit")

    def on_epoch(s: Any) -> None:
        table.add_row(str(s.epoch), f"{s.train_loss:.4f}", f"{s.train_acc:.3f}", f"{s.val_loss:.4f}",
                      f"{s.val_acc:.3f}", f"{s.seconds:.2f}")

    r = run(cache, head, FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed, augment), on_epoch,
            max_memory, calibrate)
    if as_json:
        print(_json({"head": str(head), "seconds": r.seconds, "n_train": r.n_train, "n_val": r.n_val,
                          "val_acc": r.val_acc, "val_log_loss": r.val_log_loss, "confusion": r.confusion,
                          "per_class_acc": dict(zip(("cat", "dog"), r.per_class_acc, strict=True)),
                          "calibration": r.calibration, "curve": str(r.curve) if r.curve else None,
                          "history": [vars(h) for h in r.history]}))
        return
    if not quiet:
        out.print(table)
        (tc, td), (fc, fd) = r.confusion if r.confusion else ((0, 0), (0, 0))
        cm = Table("true \\ predicted", "cat", "dog", "class accuracy", title=f"validation: {r.n_val} images")
        acc = [f"{a:.3f}" if a == a else "no images" for a in r.per_class_acc]  # nan: class absent from validation
        cm.add_row("cat", str(tc), str(td), acc[0])
        cm.add_row("dog", str(fc), str(fd), acc[1])
        out.print(cm)
        out.print(f"validation accuracy {r.val_acc:.4f}, log loss {r.val_log_loss:.4f} (the Kaggle Redux metric)")
        if r.calibration:
            c = r.calibration
            out.print(f"calibrated on validation: temperature {c['temperature']:.3f}, clip {c['clip']:g}; log loss "
                      f"{c['log_loss_before']:.4f} -> {c['log_loss_temperature']:.4f} (temperature) -> "
                      f"{c['log_loss_after']:.4f} (clip); fitted on the same split, so optimistic")
        if r.curve:
            out.print(f"training curve: {escape(str(r.curve))}", highlight=False)
    mode = " (streamed from disk)" if r.streamed else ""
    out.print(f"[green]fit[/] {r.n_train} train rows{mode}, {len(r.history)} epochs in {r.seconds:.2f}s "
              f"(load {r.load_seconds:.2f}s) -> {escape(str(head))}", highlight=False)


@app.command()
@guarded
def predict(
    data_dir: Path = typer.Argument(..., help="Folder of images to label."),
    head: Path = HEAD,
    out_csv: Path = typer.Option(Path("cache/predictions.csv"), "--out", help="CSV: path, p_cat, p_dog, label."),
    submission: Path | None = typer.Option(None, "--submission", help="Also write Kaggle Redux `id,label`."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one."),
    device: str = DEVICE,
    batch_size: int = typer.Option(0, "--batch-size", help="Images per forward pass (0: auto)."),
    workers: int = WORKERS,
    tta: bool = typer.Option(False, "--tta", help="Average the probabilities of every cached view."),
    model: Path | None = typer.Option(None, "--model", help="A file from `catdog-cache export` (no head needed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary."),
) -> None:
    """Label a folder with the head, rebuilding exactly the backbone and preprocessing it was trained on."""
    from .predict import predict as run

    with Bar(quiet or as_json) as bar:
        r = run(data_dir, head, out_csv, submission, weights, device, batch_size, workers, progress=bar, tta=tta,
                model_path=model)
    if as_json:
        print(_json({"out": str(r.out), "rows": len(r.rows), "accuracy": r.accuracy, "views": r.views,
                          "submission": str(r.submission) if r.submission else None, "seconds": r.seconds,
                          "failed": r.failed, "skipped": r.skipped}))
        return
    _print_skips("files skipped while scanning", r.skipped)
    _print_skips("files could not be decoded", r.failed)
    acc = f", accuracy {r.accuracy:.4f} on the folder's labels" if r.accuracy is not None else ""
    sub = f" and {escape(str(r.submission))}" if r.submission else ""
    out.print(f"[green]predicted[/] {len(r.rows)} images in {r.seconds:.1f}s{acc} -> {escape(str(r.out))}{sub}",
              highlight=False)


@app.command()
@guarded
def info(cache: Path = CACHE, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Rows, classes and counts, provenance, failures and size on disk of a cache."""
    from .store import read_index

    idx = read_index(cache)
    labels = idx.labels.tolist()
    summary = {
        "cache": str(cache), "rows": idx.shape[0], "views": idx.shape[1] if len(idx.shape) > 1 else 1,
        "dtype": idx.dtype, "cat": labels.count(0), "dog": labels.count(1), "unlabeled": labels.count(-1),
        "failed": len(idx.failed), "size_bytes": cache.stat().st_size, "sources": idx.sources,
        "provenance": json.loads(idx.provenance.to_json()),
    }
    if as_json:
        print(_json(summary))
        return
    t = Table(show_header=False, title=str(cache))
    t.add_row("rows", str(summary["rows"]))
    for k in ("cat", "dog", "unlabeled", "failed"):
        share = f" ({summary[k] / summary['rows']:.0%})" if summary["rows"] and k != "failed" else ""
        t.add_row(k, f"{summary[k]}{share}")
    t.add_row("size", f"{summary['size_bytes'] / 2**20:.1f} MiB")
    for k, v in summary["provenance"].items():
        t.add_row(k, escape(str(v)))
    t.add_row("sources", escape("\n".join(idx.sources)))
    out.print(t)
    _print_skips("files could not be decoded", [(p.decode(errors="replace"), r) for _, p, _, r in idx.failed])


@app.command()
@guarded
def demo(
    folder: Path = typer.Option(Path("cache/demo"), "--folder", help="Where the demo writes (replaced each run)."),
    weights: str | None = typer.Option(None, "--weights", help="Default: imagenet if cached locally, else random."),
    epochs: int = typer.Option(20, "--epochs"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    arch: str = typer.Option("vgg16", "--arch", hidden=True),
) -> None:
    """Draw a small cat/dog sample set and run extract -> fit -> predict on it, offline."""
    from .demo import run_demo

    with Bar(quiet) as bar:
        r = run_demo(folder, weights, arch, epochs, progress=bar)
    if r.weights == "random":
        out.print("[yellow]note:[/] ImageNet weights are not cached here, so the demo used seeded random weights: "
                  "the pipeline is real, the accuracy means nothing. `catdog-cache extract DIR` downloads them.",
                  soft_wrap=True)
    t = Table("stage", "seconds", "what happened", title=f"demo in {r.folder} (weights: {r.weights})")
    t.add_row("draw images", f"{r.stages['draw images']:.2f}", "48 training images in cat/ and dog/, 8 test images")
    t.add_row("extract", f"{r.stages['extract']:.2f}", f"{r.extract.extracted} images -> {r.extract.rows} rows of 4096")
    t.add_row("fit", f"{r.stages['fit']:.2f}",
              f"{len(r.fit.history)} epochs, val accuracy {r.fit.val_acc:.3f}, log loss {r.fit.val_log_loss:.3f}")
    t.add_row("predict", f"{r.stages['predict']:.2f}", f"{len(r.predict.rows)} images -> {r.predict.out}")
    t.add_row("preview", f"{r.stages['preview']:.2f}", f"{r.preview.shown} training images -> {r.preview.out}")
    out.print(t)
    out.print(f"look at: {escape(str(r.fit.curve))} (training curve), {escape(str(r.preview.out))} (predictions)",
              highlight=False, soft_wrap=True)


@app.command()
@guarded
def verify(
    data_dir: Path = typer.Argument(..., help="Labeled image folder."),
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = LR,
    dropout: float = DROPOUT,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    weights: str = typer.Option("imagenet", "--weights", help="imagenet | random | path to a VGG16 state dict."),
    limit: int | None = typer.Option(None, "--limit", help="Use this many images (half cats, half dogs)."),
    dtype: str = typer.Option("float32", "--dtype", help="Cache dtype: float16 reports the deviation."),
    precision: str = typer.Option("fp32", "--precision", help="Extraction precision: fp32 | bf16 | fp16."),
    device: str = DEVICE,
    tolerance: float = typer.Option(1e-5, "--tolerance", help="Max |difference| of probabilities."),
    arch: str = typer.Option("vgg16", "--arch", hidden=True),
    e2e_seed: int | None = typer.Option(None, "--e2e-seed", hidden=True, help="Test knob: break the agreement."),
) -> None:
    """Train the head end-to-end through the frozen network and on the cache; show they agree."""
    from .backbone import parse_weights
    from .extract import ExtractConfig
    from .fit import FitConfig
    from .verify import verify as run

    ecfg = ExtractConfig(weights=parse_weights(weights, seed), arch=arch, device=device, dtype=dtype,
                         precision=precision, workers=0)
    with Bar() as bar:
        r = run(data_dir, ecfg, FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed), limit, tolerance,
                e2e_seed, bar)
    t = Table("", "end-to-end", "cached", "max |difference|", title=f"verify: {r.n_images} images "
              f"({r.n_val} validation), {r.epochs} epochs")
    t.add_row("head weight", "", "", f"{r.max_weight_diff:.3g}")
    t.add_row("head bias", "", "", f"{r.max_bias_diff:.3g}")
    t.add_row("val probabilities", "", "", f"{r.max_prob_diff:.3g}")
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
    err.print(f"[bold red]disagree:[/] max probability difference {r.max_prob_diff:.3g} > {r.tolerance:g} "
              f"or {r.differing_labels} labels differ")
    raise typer.Exit(1)


@app.command()
@guarded
def preview(
    data_dir: Path = typer.Argument(..., help="Image folder to look at."),
    head: Path = HEAD,
    out_png: Path = typer.Option(Path("cache/preview.png"), "--out", help="PNG grid to write."),
    n: int = typer.Option(16, "--n", help="How many images (spread over the folder)."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one."),
    device: str = DEVICE,
) -> None:
    """A picture grid of images with their predicted label and probability; wrong ones framed red."""
    from .predict import preview as run

    r = run(data_dir, head, out_png, n, weights, device)
    wrong = f", {r.wrong} wrong" if r.wrong is not None else ""
    out.print(f"[green]preview[/] {r.shown} images{wrong} -> {escape(str(r.out))}", highlight=False)


@app.command()
@guarded
def export(
    head: Path = HEAD,
    out_model: Path = typer.Option(Path("cache/model.pt2"), "--out", help="Self-contained torch.export archive."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one."),
) -> None:
    """Save frozen VGG16 (up to fc7) + head + calibration as one torch.export file, runnable without the cache."""
    from .predict import export as run

    path = run(head, out_model, weights)
    out.print(f"[green]exported[/] {escape(str(path))} ({path.stat().st_size / 2**20:.1f} MiB): "
              "torch.export.load(path).module()(x) -> [B, 2] probabilities (cat, dog), x after the recorded transform",
              highlight=False)


@app.command()
@guarded
def bench(
    data: Path = typer.Option(Path("../shared/data/dogs-vs-cats/train"), "--data", help="JPEG folder for extract."),
    limit: int = typer.Option(64, "--limit", help="Images for the end-to-end extract measurement."),
    rows: int = typer.Option(25_000, "--rows", help="Rows of the synthetic cache for fit."),
    stream: str = typer.Option("25000,100000", "--stream", help="Cache sizes for streamed fit ('' to skip)."),
    markdown: bool = typer.Option(False, "--markdown", help="Also print a README-ready table."),
) -> None:
    """Measure GEMM and copy rates, VGG16 forward, extract end to end, fit, start-up; with ratios to the limits."""
    import platform
    from datetime import date

    import torch

    from .bench import run

    out.print(f"bench on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {date.today()}")
    try:
        sizes = [int(x) for x in stream.split(",") if x.strip()]
    except ValueError:
        raise CatdogError(f"--stream: expected comma-separated row counts, got {stream!r}") from None
    table = run(data, limit, rows, lambda r: out.print(f"  {r[0]:<44} {r[1]:>18}  {r[2]}", highlight=False,
                                                         soft_wrap=True), sizes)
    if markdown:
        print("| measurement | value | note |\n|---|---|---|")
        for what, value, note in table:
            print(f"| {what} | {value} | {note} |")


def main() -> None:
    app(prog_name="catdog-cache")


if __name__ == "__main__":
    sys.exit(main())
