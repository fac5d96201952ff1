"""Contact sheets: the first findings of each kind as pictures, pairs side by side with their cosine and labels,
drawn with plots.prediction_grid as preview's grids are. Folder rows are read from their files, tar rows from their
shards (each shard streamed once); a picture that cannot be read now is drawn as a grey tile, so pairs stay
aligned. Reading only: no file is moved, renamed or deleted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import printable, read_regular
from ..sources.decode import MAX_FILE_BYTES, DecodeError, decode_rgb
from ..sources.tars import picked_images
from .rows import CacheRows

TILE = 160  # pixels a side: a sheet of 16 pairs stays a few hundred KB
ITEMS = 16  # findings drawn per sheet (pairs: two tiles each)
Ref = tuple[CacheRows, int]  # a row of some cache


def pictures(refs: Sequence[Ref]) -> dict[tuple[int, int], bytes]:
    """Image bytes by (id of the CacheRows, row): a folder's files read bounded; each tar shard holding a wanted
    sample streamed once. What cannot be read is left out."""
    out: dict[tuple[int, int], bytes] = {}
    wanted: dict[str, dict[str, tuple[int, int]]] = {}
    for rows, i in refs:
        path = rows.picture_path(i)
        if path is None:
            wanted.setdefault(rows.sources[i], {})[rows.keys[i]] = (id(rows), i)
            continue
        try:
            out[(id(rows), i)] = read_regular(path, MAX_FILE_BYTES)
        except (OSError, ValueError):
            continue
    out.update(picked_images(wanted))  # each tar shard holding a wanted sample streamed once
    return out


def tile(data: bytes | None) -> np.ndarray:
    """[3, TILE, TILE] uint8: the whole picture fitted inside the square (nothing cropped: a near-copy's border
    matters), on white; grey when there is no picture."""
    from PIL import Image, ImageOps

    if data is not None:
        try:
            img = ImageOps.pad(decode_rgb(data), (TILE, TILE), method=Image.Resampling.BILINEAR, color="white")
            return np.asarray(img, np.uint8).transpose(2, 0, 1).copy()
        except (ValueError, DecodeError, OSError):
            pass
    return np.full((3, TILE, TILE), 128, np.uint8)


def name_of(rows: CacheRows, i: int, width: int = 26) -> str:
    """The row's file name (or tar key), cut to its tile: the CSV holds the full path."""
    name = printable(Path(rows.keys[i]).name)
    return name if len(name) <= width else "…" + name[-(width - 1):]


def label_of(rows: CacheRows, i: int) -> str:
    return printable(rows.label_name(i))[:16] or "unlabeled"


def sheet(items: Sequence[tuple[Sequence[Ref], Sequence[str], bool | None]], path: Path, title: str) -> Path | None:
    """One sheet: each item is one or two rows with one caption each and a frame (True red, None none). Pairs
    are drawn two to a line of four tiles, single rows four to a line."""
    from ..plots import prediction_grid

    items = list(items)[:ITEMS]
    if not items:
        return None
    refs = [r for rs, _, _ in items for r in rs]
    data = pictures(refs)
    images, captions, marks = [], [], []
    for rs, caps, mark in items:
        for (rows, i), cap in zip(rs, caps, strict=True):
            images.append(tile(data.get((id(rows), i))))
            captions.append(cap)
            marks.append(mark)
    return prediction_grid(images, captions, marks, path, cols=4, title=title)
