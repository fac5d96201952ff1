"""Outliers: rows far from every other row, e.g. a photo that is neither a cat nor a dog. A row's score is the mean
cosine similarity to its k nearest rows of the cache; a row is reported when its score lies far below the cache's
typical score (a robust z-score: distance from the median in median absolute deviations), so the rule adapts to
the backbone's cosine scale instead of a fixed cosine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .neighbours import Neighbours

K = 5  # neighbours averaged (--outlier-k): a few, so that one near-copy of an odd photo does not hide it
Z = 3.5  # robust z-score below which a row is reported (--outlier-z): Iglewicz and Hoaglin's usual cut for |z|
MAD_SCALE = 1.4826  # MAD x this estimates a normal distribution's standard deviation


@dataclass
class Outlier:
    row: int
    score: float  # mean cosine to its k nearest rows
    z: float  # robust z-score of that among the cache's rows


def knn_scores(nb: Neighbours, k: int) -> np.ndarray:
    """[N] mean cosine to each row's k nearest other rows (fewer where the cache holds fewer)."""
    s = nb.sims[:, :k]  # [N, k], best first
    have = np.isfinite(s)
    total = np.where(have, s, 0.0).sum(1)
    return np.where(have.any(1), total / np.maximum(have.sum(1), 1), np.nan).astype(np.float64)


def outliers(scores: np.ndarray, z: float = Z) -> list[Outlier]:
    """Rows whose score's robust z-score is below -z, the farthest first."""
    ok = np.isfinite(scores)
    if ok.sum() < 3:
        return []
    med = float(np.median(scores[ok]))
    mad = float(np.median(np.abs(scores[ok] - med))) * MAD_SCALE
    if mad <= 0:
        return []
    zs = (scores - med) / mad
    rows = np.flatnonzero(ok & (zs < -z))
    rows = rows[np.argsort(scores[rows], kind="stable")]
    return [Outlier(int(i), float(scores[i]), float(zs[i])) for i in rows]
