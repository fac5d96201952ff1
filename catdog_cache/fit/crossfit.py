"""K-fold cross-fitting: out-of-fold predictions for --folds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError
from .batches import feature_rows
from .config import EpochStats, FitConfig
from .data import Data
from .loop import evaluate, train
from .splits import fold_of


def cross_fit(data: Data, cfg: FitConfig, k: int, on_fold: Callable[[int, float, float], None] | None = None,
              device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[list[EpochStats]]]:
    """K-fold cross-fitting: each labeled row is predicted by a head that never saw it. Returns the out-of-fold
    logits [n, K], their labels [n], each fold's best epoch (by its held-out log loss) and each fold's history
    (its held-out curve: fit draws them)."""
    labeled = np.flatnonzero(data.raw_labels >= 0)
    fold = fold_of([data.paths[i] for i in labeled], k, cfg.seed)
    v = data.views
    oof, ys, best, histories = [], [], [], []
    for j in range(k):
        held, rest = labeled[fold == j], labeled[fold != j]
        if not len(held) or len(set(data.raw_labels[rest].tolist())) < 2:
            raise InputError(f"--folds {k}: fold {j + 1} leaves too few images; use fewer folds")
        tr = feature_rows(rest, v)
        va = feature_rows(held, v, every_view=False)
        head, history, _ = train(data.features_of, data.labels, tr, va, cfg, None, data.dim, device,
                                 len(data.classes))
        loss, acc, logits = evaluate(head, data.features_of, data.labels, va)
        best.append(min(history, key=lambda h: h.val_loss).epoch)
        histories.append(history)
        oof.append(logits)
        ys.append(data.labels[va])
        if on_fold:
            on_fold(j + 1, loss, acc)
    return torch.cat(oof), torch.cat(ys), best, histories
