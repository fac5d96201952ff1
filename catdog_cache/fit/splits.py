"""Everything random comes from explicit seeds: the generator streams, and the validation split and folds cut by a
hash of (seed, path)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def streams(seed: int) -> dict[str, int]:
    """Independent seeds for init, batch order and dropout masks. Separate streams mean that, e.g., evaluating on
    validation or computing features end-to-end cannot shift the dropout masks: both training paths draw the same
    numbers in the same order."""
    children = np.random.SeedSequence(seed).spawn(3)
    return {name: int(c.generate_state(1, np.uint64)[0] >> 1) for name, c in zip(("init", "order", "dropout"),
                                                                                  children, strict=True)}


def path_hash(paths: Sequence[bytes], seed: int) -> np.ndarray:
    """[N] uniform in [0, 1): a hash of (seed, relative path). The validation split and the folds cut it, so adding
    images never moves an existing one to another side. np.fromiter: no list of N Python floats (320 MB at 10M)."""
    salt = seed.to_bytes(8, "little", signed=True)
    return np.fromiter((int.from_bytes(hashlib.sha256(salt + p).digest()[:8], "little") / 2.0**64 for p in paths),
                       np.float64, len(paths))


def split(paths: Sequence[bytes], labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labeled rows -> (train rows, val rows). A row is validation iff a hash of (seed, path) falls below
    val_fraction: adding images never moves existing ones, and each class keeps the fraction in expectation.
    A class with at least two images and none drawn gets its lowest-hash image, so tiny sets still validate."""
    u = path_hash(paths, seed)
    labeled = labels >= 0
    val = labeled & (u < val_fraction)
    if val_fraction > 0:
        for c in np.unique(labels[labeled]):
            rows = np.flatnonzero(labels == c)
            if len(rows) >= 2 and not val[rows].any():
                val[rows[np.argmin(u[rows])]] = True
    return np.flatnonzero(labeled & ~val), np.flatnonzero(val)


def fold_of(paths: Sequence[bytes], k: int, seed: int) -> np.ndarray:
    """Fold of each row for --folds: the same hash of (seed, path) as the validation split, cut in k equal parts
    (adding images never moves an existing one to another fold)."""
    return np.minimum((path_hash(paths, seed) * k).astype(np.int64), k - 1)
