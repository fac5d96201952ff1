"""The Kaggle metric and post-hoc calibration on validation logits."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def log_loss(p: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """Log loss, clipped as Kaggle's leaderboards clip it. p [n]: P(class 1), the Kaggle Redux metric (binary log
    loss of P(dog)); p [n, 2] is taken as its second column, the same numbers; p [n, K]: multi-class log loss, each
    row clipped to [eps, 1 - eps] and renormalised (Kaggle's multi-class metric), the mean of -log p[y]."""
    p = np.asarray(p, dtype=np.float64)  # float64: 1 - 1e-15 is 1.0 in float32
    if not len(y):
        return float("nan")
    y = np.asarray(y)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if p.ndim == 1:
        p = np.clip(p, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    p = np.clip(p, eps, 1 - eps)  # [n, K]
    p /= p.sum(1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


CLIP_CANDIDATES = (0.0, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.03, 0.05)
WORST_ROWS = 5  # the worst-scored images fit and predict show


def clip_floor(n: int) -> float:
    """The least P(dog) clip n validation predictions justify: even when none of them is a confident mistake, the
    chance that the next one is stays near 1 / (n + 2) (Laplace's rule of succession), never 0. A clip of 0 lets one
    mislabeled or odd image at P 1.00 cost 10+ nats; this floor caps it at -log(1 / (n + 2)) while costing the
    confident right answers about 1 / (n + 2) nats each. The rule, and the figures that chose it over 3 / n:
    docs/results.md, "Probability floor"."""
    return 1.0 / (max(n, 0) + 2)


def clip_probs(p: np.ndarray, clip: float) -> np.ndarray:
    """Two-class probabilities [n, 2] with P(class 1) clipped to [clip, 1 - clip] (what predict writes and a
    submission scores); K classes, or clip 0, unchanged."""
    p = np.asarray(p, dtype=np.float64)
    if not clip or p.ndim != 2 or p.shape[1] != 2:
        return p
    dog = np.clip(p[:, 1], clip, 1 - clip)
    return np.stack([1 - dog, dog], 1)


def row_losses(p: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    """Each row's log loss [n] under log_loss's clipping (their mean is log_loss) for probabilities p [n, K]."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)  # [n, K]
    # two classes: log_loss clips P(class 1) and takes the other as its complement; K: clipped and renormalised
    q = np.where(np.asarray(y) == 1, p[:, 1], 1 - p[:, 1]) if p.shape[1] == 2 else p[np.arange(len(y)), y] / p.sum(1)
    return -np.log(q)


def worst_rows(names: list[str], p: np.ndarray, y: np.ndarray, classes: list[str], k: int = WORST_ROWS
               ) -> list[dict[str, object]]:
    """The k labeled rows with the highest log loss, worst first: {path, label, p_label (the probability given to
    the label), predicted, p_predicted, log_loss}. One confident mistake (often a mislabeled file) can be most of a
    set's log loss: these are the images to look at first."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y)
    if not len(y):
        return []
    loss = row_losses(p, y)
    order = sorted(range(len(y)), key=lambda i: (-loss[i], names[i]))[:k]  # ties: by name, for a stable list
    return [{"path": names[i], "label": classes[int(y[i])], "p_label": float(p[i, y[i]]),
             "predicted": classes[int(p[i].argmax())], "p_predicted": float(p[i].max()), "log_loss": float(loss[i])}
            for i in order]


def calibrate(logits: torch.Tensor, y: torch.Tensor, clip_dog: bool = True) -> dict[str, float]:
    """Temperature scaling (one scalar T for any number of classes, fitted by LBFGS on validation NLL) and, for a
    cat/dog head (clip_dog), the P(dog) clip that minimises validation log loss among the candidates at or above
    clip_floor(n) (never 0): the Kaggle Redux submission's trick, which means nothing for K classes (clip 0 there).
    Both are fitted on the validation split, so the 'after' numbers are optimistic there."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    bounds = (math.log(0.05), math.log(20.0))  # a separable validation set would drive T to 0: keep it sane

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(*bounds).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    # at (or within a factor 1.65 of) a bound: LBFGS stops on a flat loss before it reaches the bound itself
    clamped = not bounds[0] + 0.5 < float(log_t.detach()) < bounds[1] - 0.5
    t = float(log_t.detach().clamp(*bounds).exp())
    yn = y.numpy()
    before = log_loss(logits.softmax(1).numpy(), yn)
    p = (logits / t).softmax(1).numpy()  # [n, K]
    scaled = log_loss(p, yn)
    if not clip_dog:
        return {"temperature": t, "clip": 0.0, "log_loss_before": before, "log_loss_temperature": scaled,
                "log_loss_after": scaled, "clamped": clamped}
    p_dog = p[:, 1]
    floor = clip_floor(len(yn))
    candidates = sorted({floor, *(c for c in CLIP_CANDIDATES if c > floor)})
    clip = min(candidates, key=lambda c: log_loss(np.clip(p_dog, c, 1 - c), yn))  # ties: the smallest
    return {"temperature": t, "clip": clip, "log_loss_before": before, "log_loss_temperature": scaled,
            "log_loss_after": log_loss(np.clip(p_dog, clip, 1 - clip), yn), "clamped": clamped, "floor": floor}
