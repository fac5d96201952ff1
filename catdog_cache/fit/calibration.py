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


def calibrate(logits: torch.Tensor, y: torch.Tensor, clip_dog: bool = True) -> dict[str, float]:
    """Temperature scaling (one scalar T for any number of classes, fitted by LBFGS on validation NLL) and, for a
    cat/dog head (clip_dog), the P(dog) clip that minimises validation log loss: the Kaggle Redux submission's trick,
    which means nothing for K classes (clip 0 there). Both are fitted on the validation split, so the 'after' numbers
    are optimistic there."""
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
    clip = min(CLIP_CANDIDATES, key=lambda c: log_loss(np.clip(p_dog, c, 1 - c), yn))
    return {"temperature": t, "clip": clip, "log_loss_before": before, "log_loss_temperature": scaled,
            "log_loss_after": log_loss(np.clip(p_dog, clip, 1 - clip), yn), "clamped": clamped}
