"""`catdog-cache predict`: label a folder or tar shards (and write a Kaggle submission) with a trained head."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from ..files import printable
from ..store.url import cache_arg
from .common import (
    DEVICE,
    HEAD,
    JSON,
    QUIET,
    WORKERS,
    Bar,
    app,
    err,
    failures_hint,
    guarded,
    out,
    plural,
    print_skips,
    to_json,
    worst_line,
)


@app.command("predict")
@guarded
def predict_cmd(
    data_dir: str = typer.Argument(..., metavar="DATA_DIR",
                                   help="Folder of images to label, or tar shards as extract takes them: a .tar, a "
                                   "quoted brace pattern ('shards/test-{000000..000009}.tar'), a listing, a URL."),
    head: Path | None = HEAD,
    cache: list[Path] | None = typer.Option(None, "--cache", metavar="PATH", parser=cache_arg,
                                            show_default="beside the head, named after the input",
                                            help="Where the input's features are cached (reused by later "
                                            "predicts); once per backbone for an ensemble head."),
    out_csv: Path = typer.Option(Path("cache/predictions.csv"), "--out",
                                 help="CSV: path (tar input: SHARD#KEY), p_<class> per class (p_cat, p_dog), label."),
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
    """Label a folder or tar shards with the head; their features are cached, so the next head costs no backbone
    pass."""
    from ..fit import DEFAULT_HEAD
    from ..store.url import check_location
    from .precheck import predict_inputs

    cache = [check_location(c) for c in cache] if cache else None  # a store URL: only read (scoring_caches)

    predict_inputs(data_dir, head or DEFAULT_HEAD, out_csv, submission, model,
                   [c for c in cache or [] if isinstance(c, Path)])  # before torch's import
    from ..score.predict import predict

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks (and writes) for all
        predict(data_dir, head or DEFAULT_HEAD, out_csv, submission, weights, device, batch_size, workers, tta=tta,
                model_path=model, cache=cache)
        return
    with Bar(quiet or as_json) as bar:
        r = predict(data_dir, head or DEFAULT_HEAD, out_csv, submission, weights, device, batch_size,
                    workers, progress=bar, tta=tta, model_path=model, cache=cache)
    if r.weights_note and not (as_json or quiet):  # --json says it as "random_weights"; -q: the summary alone
        err.print(f"[yellow]note:[/] {escape(r.weights_note)}", highlight=False)
    if as_json:
        print(to_json({"out": str(r.out), "rows": len(r.rows), "accuracy": r.accuracy, "log_loss": r.log_loss,
                     "views": r.views, "cache": [str(c) for c in r.cache] if r.cache else None,
                     "extracted": r.extracted,
                     "submission": str(r.submission) if r.submission else None, "seconds": r.seconds,
                     "failed": r.failed, "skipped": r.skipped, "neutral": r.neutral, "worst": r.worst,
                       "random_weights": bool(r.weights_note),
                     "report": r.report.to_json() if r.report else None,
                     "confusion_plot": str(r.confusion_plot) if r.confusion_plot else None}))
        return
    print_skips("skipped while scanning", r.skipped)
    print_skips("could not be decoded", r.failed, more=failures_hint(r.cache))
    if r.neutral:
        err.print(f"[yellow]warning:[/] {plural(len(r.neutral), 'image')} could not be predicted and got the neutral "
                  f"0.5 in the submission: {escape(printable(', '.join(r.neutral[:5])))}"
                  + (" …" if len(r.neutral) > 5 else ""), highlight=False)
    report = r.report
    if report is not None and not quiet:  # a labeled input: how each class fared
        from .report import report_table

        out.print(report_table(report, f"{plural(report.n, 'labeled image')} of {escape(printable(data_dir))}"))
        if r.confusion_plot:
            out.print(f"confusion matrix: {escape(printable(str(r.confusion_plot)))}", highlight=False)
    acc = (f", accuracy {r.accuracy:.4f} and log loss {r.log_loss:.4f} on the input's labels"
           if r.accuracy is not None else "")
    sub = f" and {escape(printable(str(r.submission)))}" if r.submission else ""
    neutral = f" ({len(r.neutral)} neutral)" if r.neutral else ""
    where = (f"; features {'cached in' if r.extracted else 'read from'} "
             f"{escape(printable(', '.join(map(str, r.cache))))} "
             f"({extracted_now(r.extracted, len(r.cache), len(r.rows))})") if r.cache else ""
    if r.accuracy is not None and not quiet:
        out.print("worst-scored images (the highest log loss):", highlight=False)
        for w in r.worst:
            out.print(worst_line(w), highlight=False)
    out.print(f"[green]predicted[/] {plural(len(r.rows), 'image')} in {r.seconds:.1f}s{acc} -> "
              f"{escape(printable(str(r.out)))}{sub}{neutral}{where}", highlight=False)


def extracted_now(extracted: int, backbones: int, images: int) -> str:
    """How many backbone passes this run made, said per image for an ensemble: `200 images × 2 backbones`, not
    `400 extracted now` for 200 photos (extract's count is per cache, one cache per backbone)."""
    if backbones > 1 and extracted and extracted == images * backbones:
        return f"{plural(images, 'image')} × {backbones} backbones extracted now"
    if backbones > 1 and extracted:
        return f"{extracted:,} image × backbone passes now, over {backbones} backbones"
    return f"{extracted:,} extracted now"
