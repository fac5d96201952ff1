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
from ..fit import FitConfig, cross_fit, load


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
    confident: bool  # in the confident joint's off-diagonal (cleanlab's filter_by="confident_learning")


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
        logits, y, _, _, order = cross_fit(data, cfg, folds, None, device)  # [M, K], [M], [M] cache rows
        given = data.raw_labels[order].astype(np.int64)
        probs = np.empty((len(order), logits.shape[1]), np.float64)
        back = np.argsort(order, kind="stable")  # fold order -> row order
        probs[:] = logits.double().softmax(1).numpy()[back]
        return OutOfFold(order[back], probs, given[back], list(data.classes), folds)


def confident_guess(oof: OutOfFold) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's count (Northcutt et al. 2021, cleanlab's compute_confident_joint): class j's threshold
    is the mean probability of j over the rows labeled j; a row's guessed true class is the one class at or above its
    threshold, or the most probable where several are. Returns [M] whether a row is counted (some class is at or
    above its threshold) and [M] its guessed class."""
    k = oof.probs.shape[1]
    counts = np.bincount(oof.given, minlength=k)
    sums = np.zeros(k)
    np.add.at(sums, oof.given, oof.p_given)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)  # [K]
    above = oof.probs >= thresholds - 1e-6  # [M, K]; cleanlab's tolerance
    many = above.sum(1) > 1
    guess = np.where(many, oof.probs.argmax(1), above.argmax(1))
    return above.any(1), guess


def label_issues(oof: OutOfFold) -> list[LabelIssue]:
    """The rows whose given label the held-out heads doubt, the least likely given label first (the
    self-confidence ranking): every row whose most probable class is another one, whatever K is, and every row that
    confident learning counts off the diagonal (marked `confident`, with its guessed class as the suggestion).
    Rows flagged by argmax alone are often ambiguous photos rather than wrong labels: confident ones rarely are."""
    p_given, suggested = oof.p_given, oof.suggested
    counted, guess = confident_guess(oof)
    confident = counted & (guess != oof.given)
    suggested = np.where(confident, guess, suggested)
    doubted = np.flatnonzero((suggested != oof.given) | confident)
    doubted = doubted[np.argsort(p_given[doubted], kind="stable")]
    return [LabelIssue(int(oof.rows[i]), int(oof.given[i]), int(suggested[i]), float(p_given[i]),
                       float(oof.probs[i, suggested[i]]), bool(confident[i])) for i in doubted]
