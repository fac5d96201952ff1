"""What a fit is asked to do (FitConfig) and what each epoch reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CatdogError, InputError

MAX_DROPOUT = 0.99  # inverted dropout scales kept features by 1 / (1 - p): at most 100x (p near 1 divides by 0)

# The default epochs (FitConfig.epochs None): a fixed 20 epochs are 40 Adam steps on 160 images and leave a head far
# from converged, while a Kaggle-size set gets thousands. So the default trains at least AUTO_MIN_EPOCHS and then
# while the validation (or out-of-fold) log loss still falls (`converged`: the last FALLING_WINDOW of the epochs, and
# at least FALLING_MIN_STEPS steps' worth, lowered it by more than FALLING_REL and FALLING_ABS; a window of a few
# steps would stop a small set's slow start), up to AUTO_MAX_STEPS Adam steps; with no validation rows to watch, for
# AUTO_NO_VAL_STEPS steps. Large sets train the 20 epochs they always did (20 epochs are more steps than the cap).
# The figures that chose them: docs/results.md, "Default epochs and the probability floor".
AUTO_MIN_EPOCHS, AUTO_MAX_STEPS, AUTO_NO_VAL_STEPS = 20, 3000, 1000
FALLING_WINDOW, FALLING_REL, FALLING_MIN_EPOCHS, FALLING_MIN_STEPS = 0.2, 0.01, 5, 100
FALLING_ABS = 0.001  # nats: a 1% fall of a 0.005 loss is no reason to train on, nor to say so
NOTE_WINDOW = 0.1  # fit's "still falling" note looks at the last 10% of the epochs

if TYPE_CHECKING:  # no torch, no h5py here: the CLI checks the options with FitConfig before importing them
    import torch

    from ..cache import Index

Features = Callable[["torch.Tensor"], "torch.Tensor"]  # row indices [B] -> features [B, D], the caller's to overwrite


class Diverged(CatdogError):
    """Training produced a non-finite loss or weights."""


@dataclass(frozen=True)
class FitConfig:
    epochs: int | None = None  # None: until the validation loss stops falling (AUTO_MIN_EPOCHS, AUTO_MAX_STEPS)
    batch_size: int = 128
    lr: float = 1e-3
    dropout: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    augment: bool = False  # train on every cached view of each training image
    hidden: tuple[int, ...] = ()  # MLP head: Linear, ReLU, Dropout per hidden size, then Linear(., 2)
    keep: str = "last"  # "best": the epoch with the lowest validation log loss
    weight_decay: float = 0.0  # Adam's L2 penalty on every head parameter (torch.optim.Adam's weight_decay)

    @staticmethod
    def views_of(index: Index) -> int:
        """The cache's views per image; --augment on a one-view cache would silently do nothing, so it is refused."""
        if index.shape[1] < 2:
            raise InputError(f"--augment: the cache holds one view per image ({index.provenance.views}); extract "
                             "into a new cache with --views center,flip to train on augmented views")
        return index.shape[1]

    def check(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 < self.lr <= 1e3:  # also rejects inf and NaN; beyond 1e3 Adam's steps overflow float32
            raise InputError(f"--lr must be in (0, 1000], got {self.lr}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.keep not in ("last", "best"):
            raise InputError(f"--keep: expected last or best, got {self.keep!r}")
        if any(not 0 < h <= 65536 for h in self.hidden) or len(self.hidden) > 8:
            raise InputError(f"--hidden: expected up to 8 layer sizes in [1, 65536], got {self.hidden}")
        if not 0 <= self.weight_decay <= 10:  # also rejects inf and NaN; 10 already pins the weights to 0
            raise InputError(f"--weight-decay must be in [0, 10], got {self.weight_decay}")
        if not 0 <= self.dropout <= MAX_DROPOUT:
            raise InputError(f"--dropout must be in [0, {MAX_DROPOUT}], got {self.dropout}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, -(-n_rows // batch_size))  # windowed_batches: the last batch may be short


def max_epochs(cfg: FitConfig, n_rows: int, has_val: bool) -> int:
    """The epochs train runs at most: --epochs when given; else enough for the auto rule's steps (at least
    AUTO_MIN_EPOCHS), where it may stop early on the validation loss (has_val)."""
    if cfg.epochs is not None:
        return cfg.epochs
    steps = AUTO_MAX_STEPS if has_val else AUTO_NO_VAL_STEPS
    return max(AUTO_MIN_EPOCHS, -(-steps // steps_per_epoch(n_rows, cfg.batch_size)))


def converged(losses: list[float], steps_per_epoch: int) -> bool:
    """The default's stop: at least AUTO_MIN_EPOCHS run, and the last FALLING_WINDOW of them (at least
    FALLING_MIN_STEPS steps' worth, and fewer than all) did not lower the loss by more than FALLING_REL."""
    w = max(round(FALLING_WINDOW * len(losses)), -(-FALLING_MIN_STEPS // steps_per_epoch))
    return len(losses) >= AUTO_MIN_EPOCHS and len(losses) > w and still_falling(losses, at_least=w) is None


def still_falling(losses: list[float], window: float = FALLING_WINDOW, rel: float = FALLING_REL,
                  at_least: int = FALLING_MIN_EPOCHS) -> tuple[float, int] | None:
    """(relative drop, epochs looked at) when the lowest loss of the last `window` share of the epochs (at least
    `at_least` of them) is more than `rel` (and FALLING_ABS) below the lowest before them: the curve was still going
    down; else None (also when there is nothing before them). NaNs (no validation) count as no loss."""
    n = len(losses)
    w = max(at_least, round(window * n))
    if n <= w:
        return None
    finite = [v for v in losses[:-w] if math.isfinite(v)]
    last = [v for v in losses[-w:] if math.isfinite(v)]
    if not finite or not last:
        return None
    before, now = min(finite), min(last)
    drop = (before - now) / before if before > 0 else 0.0
    return (drop, w) if drop > rel and before - now > FALLING_ABS else None


def default_head_path(cache: Path) -> Path:
    """The head lives beside the cache it was trained on: features.h5 -> features.head.pt."""
    return cache.with_name(cache.stem + ".head.pt")


DEFAULT_HEAD = default_head_path(Path("cache/features.h5"))  # what predict, preview and export look for


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    planned: int = 0  # the most epochs this training may run (the default stops earlier once converged)

    def row(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")}
