"""An input's cached rows, read from the cache(s) and scored by the head: a folder's rows or each tar shard's,
joined side by side for an ensemble, averaged over views with --tta, labels mapped onto the head's classes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import View, encode_path, encode_paths, open_cache
from ..errors import CacheError, InputError
from ..files import printable
from ..sources.folder import Discovery, Sample
from .inputs import ScoreInput, score_input
from .scorer import Loaded


def onto_head_classes(disc: Discovery, classes: list[str], head_path: Path | str) -> None:
    """Relabel a labeled folder's samples with the head's class ids, by name (a folder of some of the classes is
    scored; its accuracy and log loss count those). A class the head has no output for cannot be scored: refused."""
    if not disc.classes:
        return
    new = [c for c in disc.classes if c not in classes and any(s.label == disc.classes.index(c) for s in disc.samples)]
    if new:
        raise InputError(f"{disc.root} has images of classes head {head_path} was not trained on "
                         f"({', '.join(printable(c) for c in new[:5])}); its classes are "
                         f"{', '.join(printable(c) for c in classes)[:300]}: give a head trained on these classes, or "
                         "a folder of its classes (or unlabeled images)")
    ids = [classes.index(c) if c in classes else -1 for c in disc.classes]
    disc.samples = [Sample(s.rel, ids[s.label]) if s.label >= 0 else s for s in disc.samples]
    disc.classes = tuple(classes)



Key = tuple[str, bytes]  # a row's (source, path): a folder's relative path, a tar shard's sample key

@dataclass
class Scored:
    """An input's rows in the cache(s), scored by the head."""

    rels: list[str]  # how outputs name each row (ScoreInput.row_name)
    labels: list[int]
    probs: np.ndarray  # [N, K] (cat, dog for two classes), averaged over views with tta
    failed: list[tuple[str, str]]
    paths_all: list[bytes]  # every row of the (first) cache, for the training split
    rows: np.ndarray  # [N] row numbers in the (first) cache
    keys: list[str] = field(default_factory=list)  # each row's path or sample key: what a Kaggle id is read from
    failed_keys: list[str] = field(default_factory=list)  # the same, for each failure
    sources: list[str] = field(default_factory=list)  # each row's source: the folder, or its tar shard


@dataclass
class CachedRows:
    """An input's rows of one cache, in the input's order (its shards as listed; each source's rows by key)."""

    x: dict[Key, np.ndarray]  # [V', D] each
    failed: list[tuple[Key, str]]
    paths: list[bytes]  # every row of the cache
    row: dict[Key, int]
    label: dict[Key, int]  # the cache's label: an index into `classes`
    classes: list[str]


GAP_ROWS = 1024  # rows of other inputs read and dropped rather than split into two reads


def read_rows(f: View, rows: np.ndarray) -> np.ndarray:
    """Features [len(rows), V, D] of these logical rows (any order), in few contiguous reads."""
    order = np.argsort(rows, kind="stable")
    srt = rows[order]  # [N]
    out = np.empty((len(rows), *f.index.shape[1:]), np.float32)  # [N, V, D]
    if not len(rows):
        return out
    cuts = (np.flatnonzero(np.diff(srt) > GAP_ROWS) + 1).tolist()
    for a, b in zip([0, *cuts], [*cuts, len(srt)], strict=True):
        lo, hi = int(srt[a]), int(srt[b - 1]) + 1
        out[order[a:b]] = f.read(lo, hi, view=None)[srt[a:b] - lo]
    return out


def input_rows(cache: Path, inp: ScoreInput, views: tuple[str, ...] | None) -> CachedRows:
    """The input's rows of one cache with the named views (None: the first, the one heads are trained on): a
    folder's discovered files, or every row of each tar shard."""
    present = None if inp.tars else set(encode_paths(inp.discovery().rels))
    with open_cache(cache) as (f, index):
        at = {s: i for i, s in enumerate(index.sources)}
        pos = {at[s]: n for n, s in enumerate(inp.sources) if s in at}  # cache source id -> place in the input
        rows = np.flatnonzero(np.isin(index.source, np.fromiter(pos, np.int64, len(pos))))
        if present is not None:
            rows = rows[np.fromiter((index.paths[r] in present for r in rows.tolist()), bool, len(rows))]
        if len(pos) > 1:  # the input's order: shards as listed, each one's rows as the cache sorts them (by key)
            rows = rows[np.argsort(np.array([pos[s] for s in index.source[rows].tolist()], np.int64), kind="stable")]
        x = read_rows(f, rows)  # [N, V, D] float32
        failed = [((index.sources[s], p), reason) for s, p, _, reason in index.failed
                  if s in pos and (present is None or p in present)]
        failed.sort(key=lambda fr: pos[at[fr[0][0]]])
        keys = [(index.sources[s], index.paths[r]) for s, r in zip(index.source[rows].tolist(), rows.tolist(),
                                                                      strict=True)]
        labels = index.labels[rows].tolist()
        paths, classes = index.paths, list(index.classes)
        names = index.provenance.views.split(",")
    x = x[:, [names.index(v) for v in views]] if views else x[:, :1]  # [N, V', D]
    if not np.isfinite(x.sum(dtype=np.float64)):  # one pass, as fit checks: NaN would reach the submission
        bad = [inp.row_name(k[0], os.fsdecode(k[1])) for k, ok in zip(keys, np.isfinite(x).reshape(len(x), -1).all(1),
                                                                      strict=True) if not ok]
        raise CacheError(f"{cache} holds NaN or infinite features for {len(bad)} images of {inp.spec} (first "
                         f"{bad[0]!r}): delete it (or give --cache a new file) and run again")
    return CachedRows(dict(zip(keys, x, strict=True)), failed, paths, dict(zip(keys, rows.tolist(), strict=True)),
                      dict(zip(keys, labels, strict=True)), classes)


def tta_views(loaded: Loaded) -> tuple[str, ...]:
    """The views every backbone of the head has, in the first one's order: an ensemble's caches are joined view by
    view, so test-time augmentation averages only the views they share."""
    member_views = [p.views.split(",") for p, _ in loaded.members] or [loaded.provenance.views.split(",")]
    return tuple(v for v in member_views[0] if all(v in m for m in member_views[1:]))


def score_cached(loaded: Loaded, caches: list[Path], data: ScoreInput | Discovery | str | os.PathLike[str],
                 tta: bool) -> Scored:
    """Apply the head to the input's cached features (an ensemble's caches joined side by side, by row key). A
    folder's labels are its Discovery's (already matched to the head's classes); tar rows' are the cache's, matched
    to the head's classes by name."""
    inp = score_input(data)
    parts = [input_rows(c, inp, tta_views(loaded) if tta else None) for c in caches]
    keys = [k for k in parts[0].x if all(k in p.x for p in parts[1:])]  # in the input's order, as the first cache
    if inp.tars:
        label = _onto_head(parts[0], loaded.classes, inp.spec)
    else:
        by_path = {encode_path(s.rel): s.label for s in inp.discovery().samples}
        label = {k: by_path[k[1]] for k in keys}
    failed = sorted({(inp.row_name(src, os.fsdecode(p)), reason, os.fsdecode(p)) for q in parts
                     for (src, p), reason in q.failed})
    if keys:
        x = torch.from_numpy(np.stack([np.concatenate([p.x[k] for p in parts], axis=-1) for k in keys]))
        n, v = x.shape[:2]  # [N, V', D]
        if loaded.head is None or x.shape[-1] != loaded.head.in_dim:  # before use: a bad matmul is a traceback
            raise CacheError(f"the head takes {loaded.head.in_dim if loaded.head else '?'}-d features, but its "
                             f"provenance made {x.shape[-1]}-d ones in {', '.join(map(str, caches))}; the head or "
                             "the cache is damaged or crafted")
        k = len(loaded.classes)
        probs = loaded.probabilities(x.reshape(n * v, -1)).reshape(n, v, k).mean(1)  # [N, K]
    else:
        probs = torch.zeros(0, len(loaded.classes))
    return Scored([inp.row_name(src, os.fsdecode(p)) for src, p in keys], [label[k] for k in keys], probs.numpy(),
                  [(name, reason) for name, reason, _ in failed], parts[0].paths,
                  np.array([parts[0].row[k] for k in keys], np.int64), [os.fsdecode(p) for _, p in keys],
                  [key for _, _, key in failed], [src for src, _ in keys])


def _onto_head(part: CachedRows, classes: list[str], spec: str) -> dict[Key, int]:
    """Tar rows' labels (the cache's class ids) as the head's, by name. A class the head has no output for cannot
    be scored: refused, as for a folder (onto_head_classes)."""
    ids = [classes.index(c) if c in classes else -1 for c in part.classes]
    new = sorted({part.classes[y] for y in part.label.values() if 0 <= y < len(ids) and ids[y] < 0})
    if new:
        raise InputError(f"{printable(spec)} has images of classes the head was not trained on "
                         f"({', '.join(printable(c) for c in new[:5])}); its classes are "
                         f"{', '.join(printable(c) for c in classes)[:300]}: give a head trained on these classes, or "
                         "shards of its classes (or unlabeled ones)")
    return {k: ids[y] if 0 <= y < len(ids) else -1 for k, y in part.label.items()}

