"""`catdog-cache export`: backbone + head as one torch.export file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..files import printable
from .common import (
    HEAD,
    app,
    guarded,
    out,
)


@app.command("export")
@guarded
def export_cmd(
    head: Path | None = HEAD,
    out_model: Path = typer.Option(Path("cache/model.pt2"), "--out", help="Self-contained torch.export archive."),
    weights: str | None = typer.Option(None, "--weights", help="The weights file, if the head was trained on one."),
) -> None:
    """Save frozen backbone + head + calibration as one torch.export file, runnable without the cache."""
    from ..fit import DEFAULT_HEAD
    from ..score.scorer import export

    path = export(head or DEFAULT_HEAD, out_model, weights)
    out.print(f"[green]exported[/] {escape(printable(str(path)))} ({path.stat().st_size / 2**20:.1f} MiB): "
              "torch.export.load(path).module()(x) -> [B, K] probabilities (cat, dog; the metadata's classes), x after "
              "the recorded transform",
              highlight=False)

