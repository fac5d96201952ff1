"""Train the head on cached features. `train` is the one training loop: fit runs it on cached rows, verify runs it
on features computed end-to-end, and the two agree because everything random comes from explicit generators."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .head import Head, new_head, save_head
from .store import Index, read_features, read_index

Features = Callable[[torch.Tensor], torch.Tensor]  # row indices [B] -> features [B, 4096]


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    dropout: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float


def streams(seed: int) -> dict[str, int]:
    """Independent seeds for init, batch order and dropout masks. Separate streams mean that, e.g., evaluating on
    validation or computing features end-to-end cannot shift the dropout masks: both training paths draw the same
    numbers in the same order."""
    children = np.random.SeedSequence(seed).spawn(3)
    return {name: int(c.generate_state(1, np.uint64)[0] >> 1) for name, c in zip(("init", "order", "dropout"),
                                                                                  children, strict=True)}


def split(paths: list[bytes], labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labeled rows -> (train rows, val rows). A row is validation iff a hash of (seed, path) falls below
    val_fraction: adding images never moves existing ones, and each class keeps the fraction in expectation.
    A class with at least two images and none drawn gets its lowest-hash image, so tiny sets still validate."""
    u = np.array([int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little", signed=True) + p).digest()[:8], "little")
                  / 2.0**64 for p in paths]) if paths else np.zeros(0)
    labeled = labels >= 0
    val = labeled & (u < val_fraction)
    if val_fraction > 0:
        for c in np.unique(labels[labeled]):
            rows = np.flatnonzero(labels == c)
            if len(rows) >= 2 and not val[rows].any():
                val[rows[np.argmin(u[rows])]] = True
    return np.flatnonzero(labeled & ~val), np.flatnonzero(val)


def evaluate(head: Head, features_of: Features, labels: torch.Tensor, rows: torch.Tensor,
             batch_size: int = 4096) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, probabilities [N, 2]) with dropout off."""
    if len(rows) == 0:
        return float("nan"), float("nan"), torch.zeros(0, 2)
    was = head.training
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(features_of(rows[s : s + batch_size])) for s in range(0, len(rows), batch_size)])
    head.train(was)
    y = labels[rows]
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits.softmax(1)


def train(features_of: Features, labels: torch.Tensor, train_rows: torch.Tensor, val_rows: torch.Tensor,
          cfg: FitConfig, on_epoch: Callable[[EpochStats], None] | None = None) -> tuple[Head, list[EpochStats]]:
    """Adam on CrossEntropy over Dropout -> Linear(4096, 2). Only the head has parameters; features are constants."""
    cfg.check()
    seeds = streams(cfg.seed)
    head = new_head(cfg.dropout, seeds["init"])
    g_order = torch.Generator().manual_seed(seeds["order"])
    g_drop = torch.Generator().manual_seed(seeds["dropout"])
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    history: list[EpochStats] = []
    head.train()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = train_rows[torch.randperm(len(train_rows), generator=g_order)]  # [n_train]
        loss_sum, correct = 0.0, 0
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s : s + cfg.batch_size]  # [B]
            x, y = features_of(rows), labels[rows]  # [B, 4096], [B]
            logits = head(x, g_drop)  # [B, 2]
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(rows)
            correct += (logits.argmax(1) == y).sum().item()
        val_loss, val_acc, _ = evaluate(head, features_of, labels, val_rows)
        n = max(len(order), 1)
        stats = EpochStats(epoch, loss_sum / n, correct / n, val_loss, val_acc, time.perf_counter() - t0)
        history.append(stats)
        if on_epoch:
            on_epoch(stats)
    head.eval()
    return head, history


def log_loss(p_dog: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """The Kaggle Redux metric: binary log loss of P(dog), clipped as the leaderboard does."""
    p = np.clip(p_dog, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


@dataclass
class FitReport:
    head_path: Path
    history: list[EpochStats]
    n_train: int
    n_val: int
    seconds: float
    load_seconds: float
    val_log_loss: float = float("nan")
    val_acc: float = float("nan")
    confusion: list[list[int]] = field(default_factory=list)  # rows: true cat/dog, cols: predicted cat/dog


def labeled_rows(index: Index, cache: Path) -> np.ndarray:
    rows = np.flatnonzero(index.labels >= 0)
    classes = set(index.labels[rows].tolist())
    if classes != {0, 1}:
        have = ", ".join(["cat", "dog"][c] for c in sorted(classes)) or "no labels"
        raise InputError(f"{cache} needs labeled cats and dogs to fit, and holds {have}: "
                         "extract a folder with cat/ and dog/ sub-folders or cat.N.jpg / dog.N.jpg files")
    return rows


def fit(cache: str | os.PathLike[str], head_path: str | os.PathLike[str], cfg: FitConfig,
        on_epoch: Callable[[EpochStats], None] | None = None) -> FitReport:
    cfg.check()
    cache = Path(cache)
    t0 = time.perf_counter()
    index = read_index(cache)
    labeled_rows(index, cache)
    x = torch.from_numpy(read_features(cache))  # [N, 4096] float32
    labels = torch.from_numpy(index.labels.astype(np.int64))  # [N]
    load_seconds = time.perf_counter() - t0
    train_np, val_np = split(index.paths, index.labels, cfg.val_fraction, cfg.seed)
    train_rows, val_rows = torch.from_numpy(train_np), torch.from_numpy(val_np)
    head, history = train(lambda r: x[r], labels, train_rows, val_rows, cfg, on_epoch)
    _, _, probs = evaluate(head, lambda r: x[r], labels, val_rows)
    y_val = labels[val_rows].numpy()
    pred = probs.argmax(1).numpy()
    confusion = [[int(((y_val == t) & (pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    seconds = time.perf_counter() - t0
    report = FitReport(Path(head_path), history, len(train_rows), len(val_rows), seconds, load_seconds,
                       log_loss(probs[:, 1].numpy(), y_val), history[-1].val_acc, confusion)
    save_head(head_path, head, {
        "provenance": index.provenance.to_json(),
        "config": asdict(cfg),
        "cache": str(cache.resolve()),
        "history": [asdict(h) for h in history],
        "metrics": {"val_log_loss": report.val_log_loss, "val_acc": report.val_acc, "confusion": confusion,
                    "n_train": report.n_train, "n_val": report.n_val},
    })
    return report
