"""`catdog-cache preview`: a picture grid of predictions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..files import printable
from ..store.url import cache_arg
from .common import (
    DEVICE,
    HEAD,
    QUIET,
    Bar,
    app,
    err,
    guarded,
    out,
    plural,
)


@app.command("preview")
@guarded
def preview_cmd(
    data_dir: str = typer.Argument(..., metavar="DATA_DIR", help="Image folder to look at, or tar shards as extract "
                                   "takes them (a .tar, a quoted brace pattern, a listing, a URL)."),
    head: Path | None = HEAD,
    cache: list[Path] | None = typer.Option(None, "--cache", metavar="PATH", parser=cache_arg,
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
    from ..fit import DEFAULT_HEAD
    from ..score.preview import preview
    from ..store.url import check_location

    cache = [check_location(c) for c in cache] if cache else None  # a store URL: only read (scoring_caches)

    with Bar(quiet) as bar:
        r = preview(data_dir, head or DEFAULT_HEAD, out_png, n, weights, device, worst, split, cache,
                    progress=bar)
    if r.weights_note and not quiet:
        err.print(f"[yellow]note:[/] {escape(r.weights_note)}", highlight=False)
    if r.out is None:
        out.print(f"[green]preview[/] {escape(printable(r.note))}", highlight=False)
        return
    if r.note:
        err.print(f"[yellow]note:[/] {escape(r.note)}")
    wrong = f", {r.wrong} wrong" if r.wrong is not None else ""
    out.print(f"[green]preview[/] {plural(r.shown, 'image')}{wrong} -> {escape(printable(str(r.out)))}",
              highlight=False)

