"""Train the head on cached features. `train` is the one training loop: fit runs it on cached rows, verify runs it
on features computed end-to-end, and the two agree because everything random comes from explicit generators."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .head import Head, MaskStream, new_head, save_head
from .store import BlockReader, Index, read_features, read_index

Features = Callable[[torch.Tensor], torch.Tensor]  # row indices [B] -> features [B, 4096]
Batches = Callable[[torch.Tensor, int, torch.Generator], Iterable[torch.Tensor]]  # (train rows, B, gen) -> batches


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    dropout: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    augment: bool = False  # train on every cached view of each training image

    @staticmethod
    def views_of(index: Index) -> int:
        """The cache's views per image; --augment on a one-view cache would silently do nothing, so it is refused."""
        if index.shape[1] < 2:
            raise InputError(f"--augment: the cache holds one view per image ({index.provenance.views}); extract "
                             "into a new cache with --views center,flip to train on augmented views")
        return index.shape[1]

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


def shuffled_batches(train_rows: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """In-memory order: one random permutation of all training rows per epoch."""
    order = train_rows[torch.randperm(len(train_rows), generator=g)]  # [n_train]
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]  # [B]


def train(features_of: Features, labels: torch.Tensor, train_rows: torch.Tensor, val_rows: torch.Tensor,
          cfg: FitConfig, on_epoch: Callable[[EpochStats], None] | None = None,
          batches: Batches = shuffled_batches) -> tuple[Head, list[EpochStats]]:
    """Adam on CrossEntropy over Dropout -> Linear(4096, 2). Only the head has parameters; features are constants."""
    cfg.check()
    seeds = streams(cfg.seed)
    head = new_head(cfg.dropout, seeds["init"])
    g_order = torch.Generator().manual_seed(seeds["order"])
    masks = MaskStream(seeds["dropout"])
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    history: list[EpochStats] = []
    head.train()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss_sum, correct, n = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
        for rows in batches(train_rows, cfg.batch_size, g_order):
            x, y = features_of(rows), labels[rows]  # [B, 4096], [B]
            logits = head(x, masks)  # [B, 2]
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(rows)  # tensors: no per-step .item()
            correct += (logits.argmax(1) == y).sum()
            n += len(rows)
        val_loss, val_acc, _ = evaluate(head, features_of, labels, val_rows)
        n = max(n, 1)
        stats = EpochStats(epoch, loss_sum.item() / n, correct.item() / n, val_loss, val_acc, time.perf_counter() - t0)
        history.append(stats)
        if on_epoch:
            on_epoch(stats)
    head.eval()
    return head, history


def log_loss(p_dog: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """The Kaggle Redux metric: binary log loss of P(dog), clipped as the leaderboard does."""
    p = np.clip(np.asarray(p_dog, dtype=np.float64), eps, 1 - eps)  # float64: 1 - 1e-15 is 1.0 in float32
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
    streamed: bool = False
    calibration: dict[str, float] = field(default_factory=dict)
    curve: Path | None = None

    @property
    def per_class_acc(self) -> list[float]:
        return [row[i] / sum(row) if sum(row) else float("nan") for i, row in enumerate(self.confusion)]


CLIP_CANDIDATES = (0.0, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.03, 0.05)


def calibrate(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Temperature scaling (one scalar T, fitted by LBFGS on validation NLL) and the P(dog) clip that minimises
    validation log loss. Both are fitted on the validation split, so the 'after' numbers are optimistic there."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    bounds = (math.log(0.05), math.log(20.0))  # a separable validation set would drive T to 0: keep it sane

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(*bounds).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().clamp(*bounds).exp())
    yn = y.numpy()
    before = log_loss(logits.softmax(1)[:, 1].numpy(), yn)
    p_dog = (logits / t).softmax(1)[:, 1].numpy()
    scaled = log_loss(p_dog, yn)
    clip = min(CLIP_CANDIDATES, key=lambda c: log_loss(np.clip(p_dog, c, 1 - c), yn))
    return {"temperature": t, "clip": clip, "log_loss_before": before, "log_loss_temperature": scaled,
            "log_loss_after": log_loss(np.clip(p_dog, clip, 1 - clip), yn)}


def labeled_rows(index: Index, cache: Path) -> np.ndarray:
    rows = np.flatnonzero(index.labels >= 0)
    classes = set(index.labels[rows].tolist())
    if classes != {0, 1}:
        have = ", ".join(["cat", "dog"][c] for c in sorted(classes)) or "no labels"
        raise InputError(f"{cache} needs labeled cats and dogs to fit, and holds {have}: "
                         "extract a folder with cat/ and dog/ sub-folders or cat.N.jpg / dog.N.jpg files")
    return rows


class Gather:
    """Row lookups into the in-memory feature matrix, written into reused buffers: a fresh 2 MB tensor per step
    costs more in page faults than the copy itself. A result is valid until the next call with as many rows."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x  # [N, D]
        self._out: dict[int, torch.Tensor] = {}

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out = self._out.get(len(rows))
        if out is None:
            out = self._out[len(rows)] = torch.empty(len(rows), self.x.shape[1])
        return torch.index_select(self.x, 0, rows, out=out)  # [B, D]


class Streamed:
    """Caches larger than memory: blocks of HDF5 chunks in a shuffled order each epoch, rows shuffled within a
    block. Unlike the in-memory permutation, a batch never mixes rows of two blocks; with blocks of thousands of
    rows in random order this is the usual shuffle-buffer trade-off (as in tf.data / WebDataset)."""

    def __init__(self, cache: Path, budget: int) -> None:
        # Two block-sized buffers may coexist (block + its gathered batch copies): stay under half the budget each.
        block_rows = max(64, budget // 2 // (4096 * 4))
        self.reader = BlockReader(cache, block_rows)

    def batches(self, train_rows: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
        br = self.reader.block_rows
        is_train = torch.zeros(self.reader.rows, dtype=torch.bool)
        is_train[train_rows] = True
        for b in torch.randperm(self.reader.blocks, generator=g).tolist():
            rows = torch.nonzero(is_train[b * br : (b + 1) * br]).flatten() + b * br  # [rows of block b]
            rows = rows[torch.randperm(len(rows), generator=g)]
            for s in range(0, len(rows), batch_size):
                yield rows[s : s + batch_size]  # [B], all in block b

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        br = self.reader.block_rows
        out = torch.empty(len(rows), 4096)  # [B, 4096]
        blocks = rows // br
        for b in torch.unique(blocks).tolist():  # sorted: sequential reads
            sel = torch.nonzero(blocks == b).flatten()
            out[sel] = torch.from_numpy(self.reader.block(b))[rows[sel] - b * br]
        return out


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GB', '1000000' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise InputError(f"--max-memory: expected a size like 512M or 4G, got {text!r}") from None
    if value < 2**20:
        raise InputError(f"--max-memory: {text} is too small; give at least 1M")
    return int(value)


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def fit(cache: str | os.PathLike[str], head_path: str | os.PathLike[str], cfg: FitConfig,
        on_epoch: Callable[[EpochStats], None] | None = None, max_memory: str | None = None,
        calibrate_head: bool = False, curve: bool = True) -> FitReport:
    """Train on the cache: in memory when the feature matrix fits the budget (default: half the available memory),
    streamed from HDF5 otherwise."""
    cfg.check()
    cache = Path(cache)
    budget = parse_size(max_memory) if max_memory else available_memory() // 2
    t0 = time.perf_counter()
    index = read_index(cache)
    labeled_rows(index, cache)
    labels = torch.from_numpy(index.labels.astype(np.int64))  # [N]
    n, v = index.shape[0], (cfg.views_of(index) if cfg.augment else 1)
    streamed = None
    if n * v * 4096 * 4 <= budget:
        x = torch.from_numpy(read_features(cache, view=None if cfg.augment else 0)).reshape(n * v, -1)  # [N*V, D]
        features_of: Features = Gather(x)
        batches: Batches = shuffled_batches
    elif cfg.augment:
        raise InputError("--augment needs every view in memory; raise --max-memory or fit without --augment")
    else:
        streamed = Streamed(cache, budget)
        features_of, batches = streamed, streamed.batches
    load_seconds = time.perf_counter() - t0
    train_np, val_np = split(index.paths, index.labels, cfg.val_fraction, cfg.seed)
    # Row r's view j is feature row r * V + j: every view of a training image trains, validation sees the center.
    train_rows = torch.from_numpy((train_np[:, None] * v + np.arange(v)).ravel())  # [n_train * V]
    val_rows = torch.from_numpy(val_np * v)  # [n_val]
    labels = labels.repeat_interleave(v)  # [N * V]
    try:
        head, history = train(features_of, labels, train_rows, val_rows, cfg, on_epoch, batches)
        _, _, logits = evaluate(head, features_of, labels, val_rows)
    finally:
        if streamed:
            streamed.reader.close()
    probs = logits.softmax(1)
    y_val = labels[val_rows].numpy()
    pred = probs.argmax(1).numpy()
    calibration = {"temperature": 1.0, "clip": 0.0}
    if calibrate_head:
        if len(val_rows) < 2:
            raise InputError("--calibrate needs a validation split: raise --val-fraction")
        calibration = calibrate(logits, labels[val_rows])
    confusion = [[int(((y_val == t) & (pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    seconds = time.perf_counter() - t0
    report = FitReport(Path(head_path), history, len(train_np), len(val_rows), seconds, load_seconds,
                       log_loss(probs[:, 1].numpy(), y_val), history[-1].val_acc, confusion,
                       streamed=streamed is not None, calibration=calibration if calibrate_head else {})
    save_head(head_path, head, {
        "provenance": index.provenance.to_json(),
        "config": asdict(cfg),
        "cache": str(cache.resolve()),
        "history": [asdict(h) for h in history],
        "metrics": {"val_log_loss": report.val_log_loss, "val_acc": report.val_acc, "confusion": confusion,
                    "n_train": report.n_train, "n_val": report.n_val},
        "temperature": calibration["temperature"],
        "clip": calibration["clip"],
    })
    if curve:
        from .plots import training_curve

        report.curve = training_curve(history, Path(head_path).with_suffix(".png"))
    return report
