"""Duplicates: exact (the same file content: the sha256 each row already records) and near (cosine similarity of
the cached features at or above a threshold), within one cache and between the audited cache and another one
(`--against`: a test photo also in the training folder is leakage that inflates every score)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .neighbours import Neighbours
from .rows import CacheRows

# Cosine at or above which two rows are reported as near-duplicates (--near). Chosen on EfficientNet-Lite0 features
# of the sample photos: re-encoded, resized copies scored well above it and distinct photos well below (docs/audit.md).
NEAR = 0.90


@dataclass
class Pair:
    a: int  # row in the audited cache
    b: int  # row in the same cache (within) or in the other cache (across)
    score: float  # cosine; 1.0 for an exact duplicate
    other: CacheRows  # where b is


def exact_within(rows: CacheRows) -> list[Pair]:
    """Rows with the same content: each copy paired with the first row holding it (a file copied n times gives
    n - 1 pairs, not n (n - 1) / 2)."""
    first: dict[str, int] = {}
    out = []
    for i, sha in enumerate(rows.sha256):
        j = first.setdefault(sha, i)
        if j != i:
            out.append(Pair(j, i, 1.0, rows))
    return out


def exact_across(rows: CacheRows, other: CacheRows) -> list[Pair]:
    """Rows of `other` whose content is also in the audited cache, each paired with the first such row."""
    first: dict[str, int] = {}
    for i, sha in enumerate(rows.sha256):
        first.setdefault(sha, i)
    return [Pair(first[sha], j, 1.0, other) for j, sha in enumerate(other.sha256) if sha in first]


def near_within(rows: CacheRows, nb: Neighbours, threshold: float) -> list[Pair]:
    """Each unordered pair of distinct rows at or above the threshold among every row's top k, most similar first;
    pairs of identical content are exact duplicates, not listed again."""
    seen: set[tuple[int, int]] = set()
    out = []
    for i, j in zip(*np.nonzero(nb.sims >= threshold), strict=True):
        a, b = sorted((int(i), int(nb.idx[i, j])))
        if (a, b) in seen or rows.sha256[a] == rows.sha256[b]:
            continue
        seen.add((a, b))
        out.append(Pair(a, b, float(nb.sims[i, j]), rows))
    return sorted(out, key=lambda p: (-p.score, p.a, p.b))


def near_across(rows: CacheRows, other: CacheRows, nb: Neighbours, threshold: float) -> list[Pair]:
    """Pairs (audited row, other row) at or above the threshold; nb holds each of `other`'s rows' top k among the
    audited rows."""
    out = []
    for j, col in zip(*np.nonzero(nb.sims >= threshold), strict=True):
        a = int(nb.idx[j, col])
        if rows.sha256[a] != other.sha256[j]:
            out.append(Pair(a, int(j), float(nb.sims[j, col]), other))
    return sorted(out, key=lambda p: (-p.score, p.a, p.b))
