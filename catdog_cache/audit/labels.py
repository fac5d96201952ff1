"""Label issues: each labeled row's out-of-fold probability of its given label (confident learning's "self
confidence", the score cleanlab ranks by). The heads are fit's own cross-fitting (`fit --folds`): each row is scored
by a head trained on the other folds, so a wrong label cannot be memorised by the head that judges it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..fit import FitConfig, cross_fit, fold_of, load


@dataclass
class OutOfFold:
    """Out-of-fold class probabilities of the labeled rows of one cache."""

    rows: np.ndarray  # [M] row numbers in the cache (its labeled rows, in row order)
    probs: np.ndarray  # [M, K] float64, softmax of the held-out head's logits
    given: np.ndarray  # [M] int64 the cache's labels
    classes: list[str]
    folds: int

    @property
    def p_given(self) -> np.ndarray:
        return self.probs[np.arange(len(self.given)), self.given]  # [M]

    @property
    def suggested(self) -> np.ndarray:
        return self.probs.argmax(1)  # [M]


@dataclass
class LabelIssue:
    row: int  # in the cache
    given: int
    suggested: int
    p_given: float
    p_suggested: float


def out_of_fold(cache: Path, cfg: FitConfig, folds: int, budget: int, device: torch.device | None
                ) -> OutOfFold:
    """Cross-fit `folds` heads with fit's machinery (in memory or streamed, as fit decides for `budget`) and put
    each held-out probability back on its row."""
    if not 2 <= folds <= 50:
        raise InputError(f"--folds must be between 2 and 50, got {folds}")
    cfg.check()
    with contextlib.ExitStack() as stack:
        data = load([cache], cfg, budget, stack, device)
        labeled = np.flatnonzero(data.raw_labels >= 0)
        if len(labeled) < 2 * folds:
            raise InputError(f"{cache}: {len(labeled):,} labeled rows are too few for --folds {folds}; use fewer "
                             "folds")
        logits, y, _, _ = cross_fit(data, cfg, folds, None, device)  # [M, K], [M] in fold order
        # cross_fit's order: fold 0's held-out rows, then fold 1's... each in row order (its folds are fold_of's)
        fold = fold_of([data.paths[i] for i in labeled], folds, cfg.seed)
        order = np.concatenate([labeled[fold == j] for j in range(folds)])
        given = data.raw_labels[order].astype(np.int64)
        if len(order) != len(y) or not np.array_equal(given, y.numpy()):
            raise RuntimeError("cross_fit's out-of-fold rows are not in fold_of's order: audit must follow fit")
        probs = np.empty((len(order), logits.shape[1]), np.float64)
        back = np.argsort(order, kind="stable")  # fold order -> row order
        probs[:] = logits.double().softmax(1).numpy()[back]
        return OutOfFold(order[back], probs, given[back], list(data.classes), folds)


def label_issues(oof: OutOfFold) -> list[LabelIssue]:
    """The rows whose held-out heads prefer another class, the least likely given label first: with K classes a
    label is doubted when some other class is more probable, whatever K is (no per-class threshold to tune)."""
    p_given, suggested = oof.p_given, oof.suggested
    doubted = np.flatnonzero(suggested != oof.given)
    doubted = doubted[np.argsort(p_given[doubted], kind="stable")]
    return [LabelIssue(int(oof.rows[i]), int(oof.given[i]), int(suggested[i]), float(p_given[i]),
                       float(oof.probs[i, suggested[i]])) for i in doubted]
