"""The one training loop (fit and verify both run it) and evaluation."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..head import Head, MaskStream, new_head
from .batches import windowed_batches
from .config import Diverged, EpochStats, Features, FitConfig
from .optim import Adam
from .splits import streams


def evaluate(head: Head, features_of: Features, labels: torch.Tensor, rows: torch.Tensor,
             batch_size: int = 4096) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits [N, 2]) with dropout off."""
    if len(rows) == 0:
        return float("nan"), float("nan"), torch.zeros(0, 2)
    was = head.training
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(features_of(rows[s : s + batch_size])) for s in range(0, len(rows), batch_size)])
    head.train(was)
    y = labels[rows]
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits


def train_threads(hidden: tuple[int, ...]) -> int:
    """Intra-op threads for the training loop. A linear head's steps are many tiny ops: with 2+ threads they spend
    their time waiting for each other, and a busy neighbour on one core stalls every step (measured on 2 cores:
    0.2 s/epoch with 1 thread vs 2-5 s with 2, bit-identical heads). An MLP head's hidden GEMMs are large enough
    to use the cores. CATDOG_FIT_THREADS overrides (bench uses it to compare)."""
    forced = os.environ.get("CATDOG_FIT_THREADS")
    if forced:
        return max(1, int(forced))
    return 1 if not hidden or max(hidden) < 256 else torch.get_num_threads()


def train(features_of: Features, labels: torch.Tensor, train_rows: torch.Tensor, val_rows: torch.Tensor,
          cfg: FitConfig, on_epoch: Callable[[EpochStats], None] | None = None, in_dim: int = 4096) -> tuple[
              Head, list[EpochStats], int]:
    """Adam on CrossEntropy over the head. Only the head has parameters; features are constants.
    Returns the head, the history and the epoch whose weights the head holds (the last, or with keep="best" the
    one with the lowest validation loss; without validation rows, the last)."""
    cfg.check()
    seeds = streams(cfg.seed)
    head = new_head(cfg.dropout, seeds["init"], in_dim, cfg.hidden)
    g_order = torch.Generator().manual_seed(seeds["order"])
    masks = MaskStream(seeds["dropout"])
    opt = Adam(head.parameters(), lr=cfg.lr)
    history: list[EpochStats] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    head.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads(cfg.hidden))
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            losses, seen, n = [], [], 0  # per-step results, reduced once per epoch (fewer small ops per step)
            for rows in windowed_batches(train_rows, cfg.batch_size, g_order):
                x, y = features_of(rows), labels[rows]  # [B, D], [B]
                logits = head(x, masks)  # [B, 2]
                loss = F.cross_entropy(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach() * len(rows))
                seen.append((logits.detach(), y))
                n += len(rows)
            train_loss = torch.stack(losses).sum().item() / max(n, 1) if losses else float("nan")
            correct = sum(int((lg.argmax(1) == y).sum()) for lg, y in seen) if seen else 0
            if not math.isfinite(train_loss):  # checked once per epoch: NaN propagates, it cannot hide
                raise Diverged(f"training diverged at epoch {epoch} (loss {train_loss}): lower --lr; no head saved")
            val_loss, val_acc, _ = evaluate(head, features_of, labels, val_rows)
            stats = EpochStats(epoch, train_loss, correct / max(n, 1), val_loss, val_acc,
                               time.perf_counter() - t0)
            if cfg.keep == "best" and math.isfinite(val_loss) and (best is None or val_loss < best[0]):
                best = (val_loss, epoch, {k: t.clone() for k, t in head.state_dict().items()})
            history.append(stats)
            if on_epoch:
                on_epoch(stats)
    finally:
        torch.set_num_threads(threads)
    kept = cfg.epochs
    if best is not None:
        kept = best[1]
        head.load_state_dict(best[2])
    head.eval()
    return head, history, kept


# A kept epoch is flagged as overfit when its validation log loss is both 20% above the lowest and 0.005 above it
# in absolute terms. The ratio alone flags noise at the tiny losses real features reach (measured: an MLP head went
# from 0.0010 to 0.0023, 2.4x, a few images' worth); the margin alone flags ordinary wobble at the ~0.3 losses of
# weak features. On EfficientNet-Lite0 features of 400 photos (README, "Keeping the best epoch"), linear heads were
# still at their lowest at epochs 20 and 40 (never flagged), MLP(512) heads ended 1.2-2.4x above theirs.
OVERFIT_RATIO, OVERFIT_MARGIN = 1.2, 0.005


def overfit(val_losses: list[float], kept: int) -> dict[str, float] | None:
    """{best_epoch, best, kept_epoch, kept} when epoch `kept` (1-based) is clearly worse than the best epoch, else
    None. val_losses[i] is epoch i + 1's validation (or mean held-out) log loss; NaNs are ignored."""
    finite = [(v, i + 1) for i, v in enumerate(val_losses) if math.isfinite(v)]
    if not finite or not 1 <= kept <= len(val_losses) or not math.isfinite(val_losses[kept - 1]):
        return None
    best, best_epoch = min(finite)
    at_kept = val_losses[kept - 1]
    if at_kept > best * OVERFIT_RATIO and at_kept > best + OVERFIT_MARGIN:
        return {"best_epoch": best_epoch, "best": best, "kept_epoch": kept, "kept": at_kept}
    return None
