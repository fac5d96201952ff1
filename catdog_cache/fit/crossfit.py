"""K-fold cross-fitting: out-of-fold predictions for --folds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError
from .batches import feature_rows
from .config import EpochStats, FitConfig, converged, max_epochs, steps_per_epoch
from .data import Data
from .loop import Trainer, evaluate, fit_threads
from .splits import fold_of


def cross_fit(data: Data, cfg: FitConfig, k: int, on_fold: Callable[[int, float, float], None] | None = None,
              device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[list[EpochStats]], np.ndarray]:
    """K-fold cross-fitting: each labeled row is predicted by a head that never saw it. Returns the out-of-fold
    logits [n, K], their labels [n], each fold's best epoch (by its held-out log loss), each fold's history (its
    held-out curve: fit draws them) and the image (cache row) of each out-of-fold row [n]. The folds' heads train
    side by side, an epoch each in turn: by default (cfg.epochs None) they all stop when the out-of-fold log loss of
    every held-out row (the folds' losses weighted by their sizes) stops falling, a steadier signal than any one
    fold's. Each head's numbers are those it would have trained alone for as many epochs."""
    labeled = np.flatnonzero(data.raw_labels >= 0)
    fold = fold_of([data.paths[i] for i in labeled], k, cfg.seed)
    v = data.views
    trainers, vals, helds = [], [], []
    for j in range(k):
        held, rest = labeled[fold == j], labeled[fold != j]
        if not len(held) or len(set(data.raw_labels[rest].tolist())) < 2:
            raise InputError(f"--folds {k}: fold {j + 1} leaves too few images; use fewer folds")
        vals.append(feature_rows(held, v, every_view=False))
        helds.append(held)
        trainers.append(Trainer(data.features_of, data.labels, feature_rows(rest, v), vals[-1], cfg, data.dim,
                                device, len(data.classes)))
    most = max(len(t.train_rows) for t in trainers)
    epochs = max_epochs(cfg, most, True)
    steps = steps_per_epoch(most, cfg.batch_size)
    weights = np.array([len(va) for va in vals], np.float64) / sum(len(va) for va in vals)
    pooled: list[float] = []  # the out-of-fold log loss after each epoch
    with fit_threads(cfg.hidden):
        for _ in range(epochs):
            pooled.append(float(np.dot(weights, [t.epoch(epochs).val_loss for t in trainers])))
            if cfg.epochs is None and converged(pooled, steps):
                break
    oof, ys, best, histories = [], [], [], []
    for j, (t, va) in enumerate(zip(trainers, vals, strict=True)):
        head, history, _ = t.finish()
        loss, acc, logits = evaluate(head, data.features_of, data.labels, va)
        best.append(min(history, key=lambda h: h.val_loss).epoch)
        histories.append(history)
        oof.append(logits)
        ys.append(data.labels[va])
        if on_fold:
            on_fold(j + 1, loss, acc)
    return torch.cat(oof), torch.cat(ys), best, histories, np.concatenate(helds)
