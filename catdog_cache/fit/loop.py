"""The one training loop (fit and verify both run it) and evaluation."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..backbone import resolve_device
from ..errors import InputError
from .ahead import RING, ahead, spare_core
from .batches import epoch_order, windowed_batches
from .config import Diverged, EpochStats, Features, FitConfig, converged, max_epochs, steps_per_epoch
from .data import Gather
from .head import DeviceMaskStream, Head, MaskStream, new_head
from .optim import Adam
from .splits import streams
from .step import LinearStep


def evaluate(head: Head, features_of: Features, labels: torch.Tensor, rows: torch.Tensor,
             batch_size: int = 4096) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits [N, K] on the CPU) with dropout off, on the head's device."""
    if len(rows) == 0:
        return float("nan"), float("nan"), torch.zeros(0, head.n_classes)
    was = head.training
    head.eval()
    on = head.linear.weight.device
    with torch.no_grad():  # .to and .cpu are no-ops on the host path
        logits = torch.cat([head(features_of(rows[s : s + batch_size]).to(on))
                            for s in range(0, len(rows), batch_size)]).cpu()
    head.train(was)
    y = labels[rows]
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits


def train_threads(hidden: tuple[int, ...]) -> int:
    """Intra-op threads for the training loop. A linear head's steps are many tiny ops: with 2+ threads they spend
    their time waiting for each other, and a busy neighbour on one core stalls every step (docs/performance.md;
    the heads are bit-identical either way). An MLP head's hidden GEMMs are large enough
    to use the cores. CATDOG_FIT_THREADS overrides (bench uses it to compare)."""
    forced = os.environ.get("CATDOG_FIT_THREADS")
    if forced:
        return max(1, int(forced))
    return 1 if not hidden or max(hidden) < 256 else torch.get_num_threads()


def training_device(device: str | torch.device) -> torch.device | None:
    """fit's --device: None for the host path (cpu, or auto without CUDA), which is every CPU fit bit for bit; the
    CUDA device, with its index, otherwise. A torch.device is taken as given and runs the device path there, even
    the CPU (the tests exercise the CUDA code that way). --device cuda without CUDA is one line (resolve_device)."""
    if isinstance(device, torch.device):
        return device
    d = resolve_device(device)
    if d.type == "cpu":
        return None
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())


def batch_source(features_of: Features, device: torch.device | None) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                  torch.Tensor]:
    """(host rows [B], device rows [B]) -> the step's features [B, D] on the training device. A matrix already on the
    device (Gather.device) is indexed with rows already there: no copy and no wait per step. Any other source
    (streamed chunks, a matrix too large for the device, verify's network) takes host rows, its batch copied over."""
    if device is None:
        return lambda rows, _: features_of(rows)
    if getattr(features_of, "device", None) == device:
        return lambda _, rows_on: features_of(rows_on)
    return lambda rows, _: features_of(rows).to(device)


def epoch_batches(train_rows: torch.Tensor, batch_size: int, g: torch.Generator, device: torch.device | None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """windowed_batches as (host rows, rows on the device): on a device the epoch's order is uploaded once and each
    step takes a view of it (a copy per step would wait for the device every step)."""
    batches = windowed_batches(train_rows, batch_size, g)  # the one order, drawn on the host's generator
    if device is None:
        yield from ((rows, rows) for rows in batches)
        return
    host = list(batches)
    on = torch.cat(host).to(device) if host else train_rows  # [n_train]
    start = 0
    for rows in host:
        yield rows, on[start : start + len(rows)]  # [B], [B]
        start += len(rows)


class Trainer:
    """One head's training, an epoch at a time: train() runs one head; cross_fit runs its folds' heads side by side
    so that the default stops them all on their pooled held-out loss. Adam on CrossEntropy over the head; only the
    head has parameters, features are constants.
    device None: the host path. A device (training_device): the head, its Adam state, the labels, each epoch's
    batch order and the dropout masks live there; the masks are the host's numbers (DeviceMaskStream) and the
    batches the same rows, so the head differs from the host's by float rounding only."""

    def __init__(self, features_of: Features, labels: torch.Tensor, train_rows: torch.Tensor, val_rows: torch.Tensor,
                 cfg: FitConfig, in_dim: int = 4096, device: torch.device | None = None, classes: int = 2) -> None:
        cfg.check()
        if len(train_rows) == 0:  # otherwise every epoch's loss is NaN, reported as a divergence
            raise InputError(f"no training rows: every labeled image is in the validation split (--val-fraction "
                             f"{cfg.val_fraction}); lower --val-fraction")
        seeds = streams(cfg.seed)
        # initialised on the host, then moved: the same init on any device
        self.head = new_head(cfg.dropout, seeds["init"], in_dim, cfg.hidden, classes)
        self.g_order = torch.Generator().manual_seed(seeds["order"])
        self.masks: MaskStream | DeviceMaskStream = MaskStream(seeds["dropout"])
        self.labels, self.labels_on = labels, labels
        if device is not None:
            self.head = self.head.to(device)
            self.masks = DeviceMaskStream(seeds["dropout"], device)
            self.labels_on = labels.to(device)  # [N]
        self.features_of, self.device, self.cfg = features_of, device, cfg
        self.train_rows, self.val_rows = train_rows, val_rows
        self.feed = batch_source(features_of, device)
        self.opt = Adam(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the host's linear head skips autograd (step.py: the same kernels, the same head bit for bit), and with a
        # spare core its batches are gathered and masked a step ahead (ahead.py: the same masks, in the same order)
        self.step = LinearStep(self.head, self.opt) if device is None and not cfg.hidden else None
        self.ahead = self.step is not None and isinstance(features_of, Gather) and spare_core() \
            and os.environ.get("CATDOG_FIT_AHEAD", "1") != "0"
        self.batch_of: Features = features_of  # the training batches' rows
        if self.ahead:
            # buffers in turn for the training batches only: evaluate's 4096-row ones stay one each (64 MB at 4096-d)
            self.batch_of = Gather(features_of.x)  # type: ignore[union-attr]
            self.batch_of.ring = self.masks.ring = RING
        self.history: list[EpochStats] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.head.train()

    def epoch(self, planned: int = 0) -> EpochStats:
        """One pass over the training rows, then the validation loss (with dropout off)."""
        epoch = len(self.history) + 1
        t0 = time.perf_counter()
        n, loss_sum, correct_t = self.host_linear_pass() if self.step is not None else self.autograd_pass()
        train_loss = loss_sum.item() / n if n else float("nan")
        correct = int(correct_t)
        if not math.isfinite(train_loss):  # checked once per epoch: NaN propagates, it cannot hide
            raise Diverged(f"training diverged at epoch {epoch} (loss {train_loss}): lower --lr; no head saved")
        val_loss, val_acc, _ = evaluate(self.head, self.features_of, self.labels, self.val_rows)
        stats = EpochStats(epoch, train_loss, correct / max(n, 1), val_loss, val_acc, time.perf_counter() - t0,
                           planned)
        if self.cfg.keep == "best" and math.isfinite(val_loss) and (self.best is None or val_loss < self.best[0]):
            self.best = (val_loss, epoch, {k: t.clone() for k, t in self.head.state_dict().items()})
        self.history.append(stats)
        return stats

    def autograd_pass(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The training pass through autograd: an MLP head, or any head on a device. (rows, loss sum, correct
        count) on the training device."""
        head, labels_on = self.head, self.labels_on
        # per-step sums kept on the training device, read once per epoch (an int() per step would wait for a
        # device); accumulated in place: a list of small per-step tensors fragmented the heap between the
        # step's large temporaries, and RSS grew with the rows of the epoch (a streamed 1M-row fit: GBs)
        loss_sum = torch.zeros((), device=labels_on.device)
        correct_t = torch.zeros((), dtype=torch.long, device=labels_on.device)
        n = 0
        for rows, rows_on in epoch_batches(self.train_rows, self.cfg.batch_size, self.g_order, self.device):
            x, y = self.feed(rows, rows_on), labels_on[rows_on]  # [B, D], [B]
            logits = head(x, self.masks)  # [B, K]
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            loss_sum.add_(loss.detach(), alpha=len(rows))  # the batch mean, weighted by its size
            correct_t.add_((logits.detach().argmax(1) == y).sum())
            n += len(rows)
        return n, loss_sum, correct_t

    def host_linear_pass(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The training pass of a linear head on the host: LinearStep, no autograd; the epoch's order drawn once
        and the predictions compared with the labels once. (rows, loss sum, correct count), as epoch() sums them."""
        assert self.step is not None
        order = epoch_order(self.train_rows, self.g_order)  # [n_train], windowed_batches' order
        pred = torch.empty(len(order), dtype=torch.long)  # [n_train] predicted classes, step by step
        y_all = self.labels[order]  # [n_train]
        loss_sum = torch.zeros(())
        b, step = self.cfg.batch_size, self.step

        def prepared(s: int) -> tuple[int, torch.Tensor, bool]:  # the batch at `s`: gathered, dropout applied
            return (s, *step.prepare(self.batch_of(order[s : s + b]), self.masks))  # [B, D]

        starts = range(0, len(order), b)
        for s, x, double in ahead(starts, prepared) if self.ahead else map(prepared, starts):
            loss = step.update(x, double, y_all[s : s + b], pred[s : s + b])
            loss_sum.add_(loss, alpha=len(x))  # the batch mean, weighted by its size: epoch()'s sum exactly
        return len(order), loss_sum, (pred == y_all).sum()

    def finish(self) -> tuple[Head, list[EpochStats], int]:
        """The head (on the CPU), the history and the epoch whose weights the head holds (the last, or with
        keep="best" the one with the lowest validation loss; without validation rows, the last)."""
        kept = len(self.history)
        if self.best is not None:
            kept = self.best[1]
            self.head.load_state_dict(self.best[2])
        self.head.eval()
        return self.head.cpu(), self.history, kept


@contextlib.contextmanager
def fit_threads(hidden: tuple[int, ...]) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads(hidden))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(features_of: Features, labels: torch.Tensor, train_rows: torch.Tensor, val_rows: torch.Tensor,
          cfg: FitConfig, on_epoch: Callable[[EpochStats], None] | None = None, in_dim: int = 4096,
          device: torch.device | None = None, classes: int = 2) -> tuple[Head, list[EpochStats], int]:
    """Train one head (Trainer): cfg.epochs epochs; or, by default (cfg.epochs None), at least AUTO_MIN_EPOCHS and
    then on while the validation loss still falls, up to the step cap (config.max_epochs); without validation rows,
    the no-validation steps. Returns Trainer.finish()'s head, history and kept epoch."""
    t = Trainer(features_of, labels, train_rows, val_rows, cfg, in_dim, device, classes)
    epochs = max_epochs(cfg, len(train_rows), len(val_rows) > 0)
    watch = cfg.epochs is None and len(val_rows) > 0  # the default: stop once the validation loss stops falling
    steps = steps_per_epoch(len(train_rows), cfg.batch_size)
    with fit_threads(cfg.hidden):
        for _ in range(epochs):
            stats = t.epoch(epochs)
            if on_epoch:
                on_epoch(stats)
            if watch and converged([h.val_loss for h in t.history], steps):
                break
    return t.finish()


# A kept epoch is flagged as overfit when its validation log loss is both 20% above the lowest and 0.005 above it
# in absolute terms. The ratio alone flags noise at the tiny losses real features reach (a few images' worth can
# double a loss of 0.001); the margin alone flags ordinary wobble at the ~0.3 losses of weak features. The figures
# that chose the two thresholds: README, fit, "--keep best".
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
