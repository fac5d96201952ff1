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
import textwrap
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

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    try:
        return _save_atomic(lambda f: fig.savefig(f, format="png", dpi=DPI), path)
    finally:
        fig.clear()  # no pyplot registry holds it; clearing just frees the artists sooner


def _plain(text: str) -> str:
    """Text from files (class folder names, file names) shown as written: a `$` would start matplotlib's mathtext,
    and a name like `$\\frac{a$` raise a parse error while drawing."""
    return text.replace("$", r"\$")


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def _figure(figsize: tuple[float, float], **kw: Any) -> Any:
    """A Figure with its Agg canvas attached: text extents can be measured before saving (label placement)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, **kw)
    FigureCanvasAgg(fig)
    return fig


def _segments(ax: Any) -> list[np.ndarray]:
    """Every curve of ax as runs of finite points in display coordinates (NaN gaps split a curve)."""
    runs = []
    for line in ax.get_lines():
        if line.get_gid() == "marker-line":  # the kept-epoch line itself: its label belongs on it
            continue
        xy = np.asarray(line.get_xydata(), dtype=float)
        ok = np.isfinite(xy).all(axis=1)
        pts = ax.transData.transform(np.where(ok[:, None], xy, 0.0))
        start = 0
        for i in range(len(xy) + 1):
            if i == len(xy) or not ok[i]:
                if i > start:
                    runs.append(pts[start:i])
                start = i + 1
    return runs


def covers_curve(bbox: Any, runs: list[np.ndarray], pad: float = 3.0) -> bool:
    """Whether a display-space box (grown by pad pixels: markers have a size) touches any curve segment."""
    from matplotlib.path import Path as MplPath
    from matplotlib.transforms import Bbox

    box = Bbox.from_extents(bbox.x0 - pad, bbox.y0 - pad, bbox.x1 + pad, bbox.y1 + pad)
    for pts in runs:
        if len(pts) == 1:
            if box.contains(*pts[0]):
                return True
        elif MplPath(pts).intersects_bbox(box, filled=False):
            return True
    return False


def _place_label(ax: Any, x: float, text: str) -> Any:
    """A label beside the vertical line at x, in the first place inside the axes where it covers no curve: top,
    bottom, then the middle rows, on the side with more room first. If every place is covered, the y range grows
    to leave an empty band at the top for it. Returns the annotation."""
    fig = ax.figure
    fig.canvas.draw()  # settle the layout: positions in pixels are final only after a draw
    renderer = fig.canvas.get_renderer()
    runs, frame = _segments(ax), ax.get_window_extent(renderer)
    lo, hi = ax.get_xlim()
    right_first = x < (lo + hi) / 2
    sides = (1, -1) if right_first else (-1, 1)

    def put(frac: float, side: int) -> Any:
        va = "top" if frac > 0.6 else "bottom" if frac < 0.4 else "center"
        return ax.annotate(text, xy=(x, frac), xycoords=("data", "axes fraction"), xytext=(4 * side, 0),
                           textcoords="offset points", ha="left" if side > 0 else "right", va=va, fontsize=9,
                           color=KEPT, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})

    for frac in (0.98, 0.02, 0.75, 0.25, 0.5):
        for side in sides:
            label = put(frac, side)
            box = label.get_window_extent(renderer)  # the text; covers_curve's pad stands for its white box
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not covers_curve(box, runs):
                return label
            label.remove()
    bottom, top = ax.get_ylim()  # no free place: an empty band above the curves
    ax.set_ylim(bottom, top + 0.25 * (top - bottom))
    return put(0.98, sides[0])


def training_curve_figure(history: Sequence[Any], kept_epoch: int | None = None, title: str = "") -> Any:
    """The training curve as a matplotlib Figure (Agg canvas attached), for training_curve to save and tests to
    inspect: log loss and accuracy per epoch, train vs validation, in two panels side by side.

    history: objects with epoch, train_loss, train_acc, val_loss, val_acc (fit.EpochStats). Validation values that
    are all NaN (no validation split) are left out rather than drawn; scattered NaNs become gaps.
    kept_epoch: when given, a dashed vertical line on both panels, labelled "kept: epoch N" where no curve is."""
    from matplotlib.ticker import MaxNLocator

    epochs = [int(e.epoch) for e in history]
    panels = [
        ("log loss (cross-entropy)", [e.train_loss for e in history], [e.val_loss for e in history]),
        ("accuracy", [e.train_acc for e in history], [e.val_acc for e in history]),
    ]
    fig = _figure((10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    marker = "o" if len(epochs) <= 30 else None  # dots help with few epochs, clutter with many
    for ax, (name, train, val) in zip(axes, panels, strict=True):
        ax.plot(epochs, np.asarray(train, dtype=float), color=TRAIN, marker=marker, ms=3, lw=1.6, label="train")
        if _finite(val):
            ax.plot(epochs, np.asarray(val, dtype=float), color=VAL, marker=marker, ms=3, lw=1.6, label="validation")
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color=KEPT, ls="--", lw=1.2, label=f"kept: epoch {kept_epoch}", gid="marker-line")
        ax.set_title(name)
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
    if title:
        fig.suptitle(title, fontsize=10)
    if kept_epoch is not None and epochs:
        for ax in axes:
            _place_label(ax, kept_epoch, f"kept: epoch {kept_epoch}")
    return fig


def training_curve(history: Sequence[Any], path: str | os.PathLike[str], kept_epoch: int | None = None,
                   title: str = "") -> Path:
    """training_curve_figure saved as PNG at path."""
    path = _target(path)  # fail on a directory before importing or drawing anything
    return _save_figure(training_curve_figure(history, kept_epoch, title), path)


FOLD_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def fold_curves_figure(histories: Sequence[Sequence[Any]], final_epochs: int | None = None, title: str = "") -> Any:
    """--folds: each fold's held-out log loss and accuracy per epoch (thin lines, its lowest loss marked), their
    mean (thick), and the epochs the final head is trained for. Returns the Figure."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure((10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (name, field) in zip(axes, (("held-out log loss", "val_loss"), ("held-out accuracy", "val_acc")),
                                 strict=True):
        curves = []
        for k, history in enumerate(histories):
            epochs = [int(e.epoch) for e in history]
            values = np.asarray([getattr(e, field) for e in history], dtype=float)
            curves.append(values)
            color = FOLD_COLORS[k % len(FOLD_COLORS)]
            ax.plot(epochs, values, color=color, lw=1.0, alpha=0.8, label=f"fold {k + 1}")
            if field == "val_loss" and np.isfinite(values).any():
                best = int(np.nanargmin(values))
                ax.plot([epochs[best]], [values[best]], "o", color=color, ms=4)
        if curves and len({len(c) for c in curves}) == 1:
            with np.errstate(all="ignore"):
                mean = np.nanmean(np.stack(curves), axis=0)
            ax.plot(range(1, len(mean) + 1), mean, color="black", lw=2.2, label="mean of folds")
        if final_epochs is not None:
            ax.axvline(final_epochs, color=KEPT, ls="--", lw=1.2, label=f"final head: {final_epochs} epochs",
                       gid="marker-line")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the panels: the title is above them
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 8), frameon=False)
    fig.suptitle(title or f"{len(histories)}-fold cross-fitting: each fold's held-out curve (dot: its lowest loss)",
                 fontsize=10)
    if final_epochs is not None and histories:
        for ax in axes:
            _place_label(ax, final_epochs, f"final head: {final_epochs} epochs")
    return fig


def fold_curves(histories: Sequence[Sequence[Any]], path: str | os.PathLike[str], final_epochs: int | None = None,
                title: str = "") -> Path:
    path = _target(path)
    return _save_figure(fold_curves_figure(histories, final_epochs, title), path)


def reliability_bins(p_dog: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins of P(dog): (mean predicted P(dog), observed share of dogs, count) per bin; NaN where empty."""
    p, y = np.asarray(p_dog, dtype=float), np.asarray(y, dtype=float)
    which = np.clip((p * bins).astype(int), 0, bins - 1)  # P = 1.0 goes in the last bin
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=bins) / count
        observed = np.bincount(which, weights=y, minlength=bins) / count
    return mean_p, observed, count


def expected_calibration_error(p_dog: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |observed - predicted| over the bins."""
    mean_p, observed, count = reliability_bins(p_dog, y, bins)
    used = count > 0
    return float((np.abs(observed - mean_p)[used] * count[used]).sum() / max(count.sum(), 1))


def reliability_figure(curves: dict[str, np.ndarray], y: np.ndarray, bins: int = 10, title: str = "",
                       what: tuple[str, str] = ("P(dog)", "share of dogs")) -> Any:
    """Reliability diagram: per bin of predicted P(dog), the observed share of dogs (on the diagonal: calibrated),
    one curve per set of probabilities (e.g. as trained, calibrated); below, how many images each bin holds.
    what: (the probability, what y counts): for K classes, the predicted class's probability and the share right."""
    fig = _figure((6.4, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    top.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1, label="perfectly calibrated")
    width = 1 / bins / (len(curves) + 1)
    centers = (np.arange(bins) + 0.5) / bins
    colors = (VAL, TRAIN, RIGHT)
    for k, (name, p) in enumerate(curves.items()):
        mean_p, observed, count = reliability_bins(p, y, bins)
        used = count > 0
        color = colors[k % len(colors)]
        ece = expected_calibration_error(p, y, bins)
        top.plot(mean_p[used], observed[used], "-", color=color, lw=1.2, alpha=0.6, label=f"{name} (ECE {ece:.3f})")
        # a bin of 2 images says little: dot area grows with the count, and the count is written beside it
        top.scatter(mean_p[used], observed[used], s=12 + 60 * np.sqrt(count[used] / count.max()), color=color,
                    zorder=3)
        for px, py, c in zip(mean_p[used], observed[used], count[used], strict=True):
            # beside the dot, inward from the edges; the first curve's counts above, the second's below
            dy = (8 if k == 0 else -8) if 0.08 < py < 0.92 else (8 + 8 * k if py <= 0.08 else -8 - 8 * k)
            top.annotate(str(c), (px, py), xytext=(-6 if px > 0.85 else 6, dy), textcoords="offset points",
                         ha="right" if px > 0.85 else "left", va="center", fontsize=7, color=color)
        x = centers + (k - (len(curves) - 1) / 2) * width
        bars = bottom.bar(x, count, width=width, color=color, alpha=0.75, label=name)
        bottom.bar_label(bars, labels=[str(c) if c else "" for c in count], fontsize=7, padding=1)
    top.set_xlim(-0.03, 1.03)  # dots at 0 and 1 whole
    top.set_ylim(-0.06, 1.06)
    top.set_ylabel(f"observed {what[1]}")
    top.set_title(title or f"reliability of {what[0]} on {len(y):,} images ({bins} bins)", fontsize=10)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize=8, frameon=False)
    bottom.set_xlabel(f"predicted {what[0]}")
    bottom.set_ylabel("images")
    bottom.set_xticks(np.linspace(0, 1, bins + 1))
    bottom.set_ylim(0, max(1.0, bottom.get_ylim()[1] * 1.15))  # room for the counts above the bars
    bottom.grid(True, axis="y", alpha=0.3)
    return fig


def reliability_diagram(curves: dict[str, np.ndarray], y: np.ndarray, path: str | os.PathLike[str], bins: int = 10,
                        title: str = "", what: tuple[str, str] = ("P(dog)", "share of dogs")) -> Path:
    path = _target(path)
    return _save_figure(reliability_figure(curves, y, bins, title, what), path)


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> Any:
    """K x K counts, rows the true class, columns the predicted one, each cell shaded by its share of its row (so a
    small class's mistakes show as plainly as a large one's); the row's accuracy beside each class name."""
    from .files import printable

    counts = np.asarray(confusion, dtype=float)  # [K, K]
    k = len(classes)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)  # [K, K] row-normalised
    side = min(max(4.0, 0.45 * k + 2.5), 24.0)
    fig = _figure((side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [_plain(printable(c)[:16]) for c in classes]  # folder names: printable, cut to keep the axes readable
    ax.set_xticks(range(k), names, rotation=90 if k > 6 else 0, fontsize=8)
    ax.set_yticks(range(k), [f"{n} ({share[i, i]:.2f})" if rows[i, 0] else f"{n} (none)"
                             for i, n in enumerate(names)], fontsize=8)
    if k <= 30:  # past that the numbers no longer fit their cells: the shading still shows where mistakes go
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (accuracy)")
    ax.set_title(title or f"confusion on {int(counts.sum()):,} images", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike[str],
                     title: str = "") -> Path:
    path = _target(path)
    return _save_figure(confusion_figure(confusion, classes, title), path)


def prediction_grid(images: Sequence[Any], captions: Sequence[str], wrong: Sequence[bool | None],
                    path: str | os.PathLike[str], cols: int = 4, title: str = "") -> Path:
    """Images ([3, H, W] uint8 tensors or arrays) in a grid, cols wide, each captioned above; wrong ones framed and
    captioned red, right ones framed green, unknown truth (None) unframed. Captions may hold newlines; the title
    (which head, which backbone) sits above the grid."""
    fig = prediction_grid_figure(images, captions, wrong, cols, title)
    return _save_figure(fig, _target(path))


def prediction_grid_figure(images: Sequence[Any], captions: Sequence[str], wrong: Sequence[bool | None],
                           cols: int = 4, title: str = "") -> Any:
    """The grid as a Figure (see prediction_grid)."""
    if not (len(images) == len(captions) == len(wrong)):
        raise ValueError(f"{len(images)} images, {len(captions)} captions, {len(wrong)} wrong flags: need one each")
    if not images:
        raise ValueError("prediction_grid: no images to draw")
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    pixels = [np.asarray(img.cpu() if hasattr(img, "cpu") else img).transpose(1, 2, 0) for img in images]  # [H,W,3]
    cols = min(cols, len(pixels))
    rows = math.ceil(len(pixels) / cols)
    # fixed pixel layout (no layout engine: it is the slow part with many axes), each image shown at ~1:1
    img_h = max(p.shape[0] for p in pixels)
    img_w = max(p.shape[1] for p in pixels)
    lines = max(c.count("\n") + 1 for c in captions)
    pad, cap_h = 16, 13 * lines + 8
    cell_w, cell_h = img_w + pad, img_h + cap_h + pad
    fig_w = cols * cell_w + pad
    # the title wrapped to the grid's width (about 8 pixels per character at 10 points)
    title = "\n".join(textwrap.fill(part, max(24, int(fig_w / 8))) for part in title.split("\n")) if title else ""
    title_h = 16 * (title.count("\n") + 1) + 4 if title else 0
    fig_h = rows * cell_h + pad + title_h
    fig = _figure((fig_w / DPI, fig_h / DPI))
    if title:
        fig.text(0.5, 1 - (pad / 2) / fig_h, _plain(title), ha="center", va="top", fontsize=10, wrap=False)
    for k, (px, text, bad) in enumerate(zip(pixels, captions, wrong, strict=True)):
        r, c = divmod(k, cols)
        left = pad + c * cell_w
        top = title_h + pad + r * cell_h + cap_h  # the image's top edge, in pixels from the figure's top
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
        ax.set_title(_plain(text), fontsize=8, color=WRONG if bad else "black", pad=4)
    return fig
