"""Pictures where looking beats reading: the training curve and the prediction grid, drawn with matplotlib.

Both use the object-oriented API (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``) rather than pyplot: no global
figure registry, no GUI backend, safe to call from worker threads. matplotlib is imported inside the functions so
that importing this module (the CLI does) stays cheap. Every PNG is written through ``_save_atomic``: an exclusive,
randomly named temp file next to the target, fsynced, then renamed over it, so a reader never sees half a PNG and a
planted symlink can't redirect the write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import InputError
from .files import write_atomic

TRAIN, VAL, KEPT = "#1f77b4", "#ff7f0e", "0.35"  # the usual blue / orange; kept-epoch line in dark grey
WRONG, RIGHT = "#d62728", "#2ca02c"
DPI = 100


def _target(path: str | os.PathLike[str]) -> Path:
    """Check the output path before any drawing work; create its folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_atomic(write: Callable[[IO[bytes]], None], path: str | os.PathLike[str]) -> Path:
    """Exclusive temp file in path's folder, fsync, rename over path (a planted `x.png.tmp` link is never followed)."""
    return write_atomic(_target(path), write)


def _save_figure(fig: Any, path: Path) -> Path:
    """Render fig as PNG through Agg into path (atomically), then drop the figure's artists."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    try:
        return _save_atomic(lambda f: fig.savefig(f, format="png", dpi=DPI), path)
    finally:
        fig.clear()  # no pyplot registry holds it; clearing just frees the artists sooner


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def training_curve(history: Sequence[Any], path: str | os.PathLike[str], kept_epoch: int | None = None) -> Path:
    """Log loss and accuracy per epoch, train vs validation, in two panels side by side; saved as PNG at path.

    history: objects with epoch, train_loss, train_acc, val_loss, val_acc (fit.EpochStats). Validation values that
    are all NaN (no validation split) are left out rather than drawn; scattered NaNs become gaps.
    kept_epoch: when given, a dashed vertical line labelled "kept: epoch N" on both panels."""
    path = _target(path)  # fail on a directory before importing or drawing anything
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [int(e.epoch) for e in history]
    panels = [
        ("log loss (cross-entropy)", [e.train_loss for e in history], [e.val_loss for e in history]),
        ("accuracy", [e.train_acc for e in history], [e.val_acc for e in history]),
    ]
    fig = Figure(figsize=(10, 4.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    marker = "o" if len(epochs) <= 30 else None  # dots help with few epochs, clutter with many
    for ax, (title, train, val) in zip(axes, panels, strict=True):
        ax.plot(epochs, np.asarray(train, dtype=float), color=TRAIN, marker=marker, ms=3, lw=1.6, label="train")
        if _finite(val):
            ax.plot(epochs, np.asarray(val, dtype=float), color=VAL, marker=marker, ms=3, lw=1.6, label="validation")
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color=KEPT, ls="--", lw=1.2, label=f"kept: epoch {kept_epoch}")
            # the label sits at the top of the line, on whichever side has more room
            right_half = bool(epochs) and kept_epoch > (min(epochs) + max(epochs)) / 2
            ax.annotate(f"kept: epoch {kept_epoch}", xy=(kept_epoch, 1), xycoords=("data", "axes fraction"),
                        xytext=(-4 if right_half else 4, -4), textcoords="offset points",
                        ha="right" if right_half else "left", va="top", fontsize=9, color=KEPT,
                        bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})  # readable over the grid
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))  # round steps: 0.1, not 0.08
        ax.grid(True, alpha=0.3)
    if not epochs:
        axes[0].text(0.5, 0.5, "no epochs", transform=axes[0].transAxes, ha="center", va="center")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        # one legend for both panels, above them: it can never cover a curve
        fig.legend(handles, labels, loc="outside upper center", ncols=len(handles), frameon=False)
    return _save_figure(fig, path)


def prediction_grid(images: Sequence[Any], captions: Sequence[str], wrong: Sequence[bool | None],
                    path: str | os.PathLike[str], cols: int = 4) -> Path:
    """Images ([3, H, W] uint8 tensors or arrays) in a grid, cols wide, each captioned above; wrong ones framed and
    captioned red, right ones framed green, unknown truth (None) unframed. Captions may hold newlines."""
    if not (len(images) == len(captions) == len(wrong)):
        raise ValueError(f"{len(images)} images, {len(captions)} captions, {len(wrong)} wrong flags: need one each")
    if not images:
        raise ValueError("prediction_grid: no images to draw")
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    path = _target(path)
    from matplotlib.figure import Figure

    pixels = [np.asarray(img.cpu() if hasattr(img, "cpu") else img).transpose(1, 2, 0) for img in images]  # [H,W,3]
    cols = min(cols, len(pixels))
    rows = math.ceil(len(pixels) / cols)
    # fixed pixel layout (no layout engine: it is the slow part with many axes), each image shown at ~1:1
    img_h = max(p.shape[0] for p in pixels)
    img_w = max(p.shape[1] for p in pixels)
    lines = max(c.count("\n") + 1 for c in captions)
    pad, cap_h = 16, 13 * lines + 8
    cell_w, cell_h = img_w + pad, img_h + cap_h + pad
    fig_w, fig_h = cols * cell_w + pad, rows * cell_h + pad
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    for k, (px, text, bad) in enumerate(zip(pixels, captions, wrong, strict=True)):
        r, c = divmod(k, cols)
        left = pad + c * cell_w
        top = pad + r * cell_h + cap_h  # the image's top edge, in pixels from the figure's top
        ax = fig.add_axes((left / fig_w, 1 - (top + img_h) / fig_h, img_w / fig_w, img_h / fig_h))
        ax.imshow(px, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            if bad is None:
                spine.set_visible(False)
            else:
                spine.set_color(WRONG if bad else RIGHT)
                spine.set_linewidth(4)
        ax.set_title(text, fontsize=8, color=WRONG if bad else "black", pad=4)
    return _save_figure(fig, path)
