"""Pictures where looking beats reading: the training curve and the prediction grid (Pillow + torchvision)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TRAIN, VAL = (31, 119, 180), (255, 127, 14)  # the usual blue / orange
WRONG, RIGHT = (214, 39, 40), (44, 160, 44)


def _save_atomic(im: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _panel(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: Sequence[tuple[str, tuple[int, int, int], Sequence[float]]]) -> None:
    """One line chart in box (x0, y0, x1, y1): axes, min/max labels, a legend."""
    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    d.text((x0, y0 - 18), title, fill=(0, 0, 0), font=font)
    d.rectangle(box, outline=(0, 0, 0))
    values = [v for _, _, s in series for v in s if math.isfinite(v)]
    if not values:
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    n = max(len(s) for _, _, s in series)
    for _, color, s in series:
        pts = [(x0 + (x1 - x0) * (i / max(n - 1, 1)), y1 - (y1 - y0) * ((v - lo) / (hi - lo)))
               for i, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
    d.text((x0 - 48, y0), f"{hi:.3f}", fill=(0, 0, 0), font=font)
    d.text((x0 - 48, y1 - 10), f"{lo:.3f}", fill=(0, 0, 0), font=font)
    d.text((x0, y1 + 4), "epoch 1", fill=(0, 0, 0), font=font)
    d.text((x1 - 50, y1 + 4), f"epoch {n}", fill=(0, 0, 0), font=font)
    for k, (name, color, _) in enumerate(series):
        d.line([(x1 - 90, y0 + 12 + 14 * k), (x1 - 70, y0 + 12 + 14 * k)], fill=color, width=3)
        d.text((x1 - 65, y0 + 6 + 14 * k), name, fill=(0, 0, 0), font=font)


def training_curve(history: Sequence, path: str | os.PathLike[str], size: tuple[int, int] = (900, 360)) -> Path:
    """Loss and accuracy per epoch, train vs validation, side by side."""
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    w, h = size
    half = w // 2
    _panel(d, (60, 30, half - 20, h - 30), "cross-entropy loss",
           [("train", TRAIN, [e.train_loss for e in history]), ("val", VAL, [e.val_loss for e in history])])
    _panel(d, (half + 60, 30, w - 20, h - 30), "accuracy",
           [("train", TRAIN, [e.train_acc for e in history]), ("val", VAL, [e.val_acc for e in history])])
    return _save_atomic(im, Path(path))


def prediction_grid(images: Sequence, captions: Sequence[str], wrong: Sequence[bool | None],
                    path: str | os.PathLike[str], cols: int = 4) -> Path:
    """Images ([3, H, W] uint8 tensors) in a torchvision grid, each captioned; wrong ones framed red,
    right ones green, unknown truth unframed."""
    import torch
    from torchvision.utils import make_grid

    framed = []
    for img, bad in zip(images, wrong, strict=True):
        color = None if bad is None else (WRONG if bad else RIGHT)
        pad = torch.tensor(color or (255, 255, 255), dtype=torch.uint8)[:, None, None]
        canvas = pad.expand(3, img.shape[1] + 12, img.shape[2] + 12).clone()  # [3, H+12, W+12] frame
        canvas[:, 6:-6, 6:-6] = img
        framed.append(canvas)
    grid = make_grid(framed, nrow=cols, padding=28, pad_value=255)  # [3, rows*(H+40), cols*(W+40)]
    im = Image.fromarray(grid.permute(1, 2, 0).numpy())
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    cell_w, cell_h = framed[0].shape[2] + 28, framed[0].shape[1] + 28
    for k, text in enumerate(captions):
        r, c = divmod(k, cols)
        color = WRONG if wrong[k] else (0, 0, 0)
        d.text((28 + c * cell_w, 28 + r * cell_h + framed[0].shape[1] + 2), text, fill=color, font=font)
    return _save_atomic(im, Path(path))
