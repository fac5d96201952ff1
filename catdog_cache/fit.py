"""Train the head on cached features. `train` is the one training loop: fit runs it on cached rows, verify runs it
on features computed end-to-end, and the two agree because everything random comes from explicit generators."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CatdogError, InputError
from .files import as_paths, check_outputs
from .head import MAX_DROPOUT, Head, MaskStream, new_head, save_head
from .store import CHUNK_ROWS, BlockReader, Index, open_cache, read_features

Features = Callable[[torch.Tensor], torch.Tensor]  # row indices [B] -> features [B, D], the caller's to overwrite
WINDOW_CHUNKS = 8  # batch order: 8 random 64-row chunks (512 rows) are shuffled together; see windowed_batches


class Diverged(CatdogError):
    """Training produced a non-finite loss or weights."""


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    dropout: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    augment: bool = False  # train on every cached view of each training image
    hidden: tuple[int, ...] = ()  # MLP head: Linear, ReLU, Dropout per hidden size, then Linear(., 2)
    keep: str = "last"  # "best": the epoch with the lowest validation log loss

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
        if not 0 < self.lr <= 1e3:  # also rejects inf and NaN; beyond 1e3 Adam's steps overflow float32
            raise InputError(f"--lr must be in (0, 1000], got {self.lr}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.keep not in ("last", "best"):
            raise InputError(f"--keep: expected last or best, got {self.keep!r}")
        if any(not 0 < h <= 65536 for h in self.hidden) or len(self.hidden) > 8:
            raise InputError(f"--hidden: expected up to 8 layer sizes in [1, 65536], got {self.hidden}")
        if not 0 <= self.dropout <= MAX_DROPOUT:
            raise InputError(f"--dropout must be in [0, {MAX_DROPOUT}], got {self.dropout}")
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

    def row(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")}


def streams(seed: int) -> dict[str, int]:
    """Independent seeds for init, batch order and dropout masks. Separate streams mean that, e.g., evaluating on
    validation or computing features end-to-end cannot shift the dropout masks: both training paths draw the same
    numbers in the same order."""
    children = np.random.SeedSequence(seed).spawn(3)
    return {name: int(c.generate_state(1, np.uint64)[0] >> 1) for name, c in zip(("init", "order", "dropout"),
                                                                                  children, strict=True)}


def path_hash(paths: list[bytes], seed: int) -> np.ndarray:
    """[N] uniform in [0, 1): a hash of (seed, relative path). The validation split and the folds cut it, so adding
    images never moves an existing one to another side."""
    salt = seed.to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.sha256(salt + p).digest()[:8], "little") / 2.0**64 for p in paths],
                    dtype=np.float64)


def split(paths: list[bytes], labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labeled rows -> (train rows, val rows). A row is validation iff a hash of (seed, path) falls below
    val_fraction: adding images never moves existing ones, and each class keeps the fraction in expectation.
    A class with at least two images and none drawn gets its lowest-hash image, so tiny sets still validate."""
    u = path_hash(paths, seed)
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


def windowed_batches(train_rows: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """The one batch order, defined by the seed and the cache alone (never by the memory budget): each epoch the
    64-row chunks that hold training rows are put in random order, taken WINDOW_CHUNKS at a time, and the rows of
    each window are shuffled together. In memory or streamed from disk, fit sees the same batches, and a streamed
    epoch reads each 1 MiB chunk once. A window mixes 8 chunks from anywhere in the file, so batches mix classes
    even when the rows are sorted (Kaggle names: all cats, then all dogs)."""
    chunk = train_rows // CHUNK_ROWS  # [n_train]
    ids = torch.unique(chunk)  # [C] sorted
    rank = torch.empty(int(ids[-1]) + 1 if len(ids) else 0, dtype=torch.long)
    rank[ids[torch.randperm(len(ids), generator=g)]] = torch.arange(len(ids))  # chunk id -> position this epoch
    window = rank[chunk] // WINDOW_CHUNKS  # [n_train]
    noise = torch.randperm(len(train_rows), generator=g)  # [n_train] uniform order within a window
    order = train_rows[torch.argsort(window * len(train_rows) + noise)]  # [n_train]
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]  # [B]


class Adam:
    """Adam (Kingma & Ba, torch.optim.Adam's defaults and update), written out: importing torch.optim pulls in
    torch._dynamo, about a second per process, longer than a whole 20-epoch fit of a linear head."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        grads = [p.grad for p in self.params]
        # _foreach ops: one dispatch for all parameters (a linear head's step is dominated by per-op overhead)
        torch._foreach_lerp_(self.m, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)  # v = b2 v + (1 - b2) g^2
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(c2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-self.lr / c1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


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
    kept_epoch: int = 0
    head_shape: str = ""
    folds: dict[str, Any] = field(default_factory=dict)  # --folds: K, each fold's best epoch, the final epochs
    missing: list[str] = field(default_factory=list)  # ensemble: images in only some of the caches
    unlabeled: int = 0  # rows without a label, not used

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
    # at (or within a factor 1.65 of) a bound: LBFGS stops on a flat loss before it reaches the bound itself
    clamped = not bounds[0] + 0.5 < float(log_t.detach()) < bounds[1] - 0.5
    t = float(log_t.detach().clamp(*bounds).exp())
    yn = y.numpy()
    before = log_loss(logits.softmax(1)[:, 1].numpy(), yn)
    p_dog = (logits / t).softmax(1)[:, 1].numpy()
    scaled = log_loss(p_dog, yn)
    clip = min(CLIP_CANDIDATES, key=lambda c: log_loss(np.clip(p_dog, c, 1 - c), yn))
    return {"temperature": t, "clip": clip, "log_loss_before": before, "log_loss_temperature": scaled,
            "log_loss_after": log_loss(np.clip(p_dog, clip, 1 - clip), yn), "clamped": clamped}


def labeled_rows(index: Index, cache: Path) -> np.ndarray:
    if index.shape[0] == 0:
        raise InputError(f"{cache} is empty (0 rows; an extract interrupted before its first batch?): run extract")
    rows = np.flatnonzero(index.labels >= 0)
    classes = set(index.labels[rows].tolist())
    if classes != {0, 1}:
        have = ", ".join(["cat", "dog"][c] for c in sorted(classes)) or "no labels"
        raise InputError(f"{cache} needs labeled cats and dogs to fit, and holds {have}: "
                         "extract a folder with cat/ and dog/ sub-folders or cat.N.jpg / dog.N.jpg files")
    return rows


def check_finite(x: np.ndarray, where: str) -> None:
    # A float64 sum is one pass without a temporary (0.05 s for 400 MB, 10x less than isfinite().all()): any NaN or
    # inf makes it non-finite, and float32 values cannot overflow it, so a finite total proves every value finite.
    if not np.isfinite(x.sum(dtype=np.float64)):
        raise InputError(f"{where} holds NaN or infinite features: extract again (or with --precision fp32)")


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
    """Caches larger than memory: the rows of each batch are looked up in whole 64-row chunks read from HDF5 and
    kept in a small least-recently-used set sized by the budget. The batch order (windowed_batches) visits the
    chunks one window at a time, so each chunk is read once per epoch and reads stay 1 MiB-sequential. The budget
    changes only what is cached, never which rows form a batch: heads are identical for any --max-memory."""

    def __init__(self, f, budget: int, where: str) -> None:
        self.reader = BlockReader(f, CHUNK_ROWS)  # one chunk per block
        self.where = where
        chunk_bytes = CHUNK_ROWS * self.reader.dim * 4
        self.capacity = max(2, budget // chunk_bytes)  # two windows fit in 16 MiB at 4096-d: one read per chunk
        self._chunks: OrderedDict[int, torch.Tensor] = OrderedDict()

    def chunk(self, c: int) -> torch.Tensor:
        t = self._chunks.get(c)
        if t is None:
            block = self.reader.block(c)  # [<=64, D]
            check_finite(block, self.where)
            t = self._chunks[c] = torch.from_numpy(block.copy())
            if len(self._chunks) > self.capacity:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(c)
        return t

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(rows), self.reader.dim)  # [B, D]
        chunks = rows // CHUNK_ROWS
        for c in torch.unique(chunks).tolist():
            sel = torch.nonzero(chunks == c).flatten()
            out[sel] = self.chunk(c)[rows[sel] - c * CHUNK_ROWS]
        return out


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GB', '1000000' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise InputError(f"--max-memory: expected a size like 512M or 4G, got {text!r}") from None
    if not math.isfinite(value) or value > 2**60:
        raise InputError(f"--max-memory: expected a size like 512M or 4G, got {text!r}")
    if value < 2**20:
        raise InputError(f"--max-memory: {text} is too small; give at least 1M")
    return int(value)


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def default_head_path(cache: Path) -> Path:
    """The head lives beside the cache it was trained on: features.h5 -> features.head.pt."""
    return cache.with_name(cache.stem + ".head.pt")


DEFAULT_HEAD = default_head_path(Path("cache/features.h5"))  # what predict, preview and export look for


@dataclass
class Data:
    """What training needs from one or more caches: features by row, labels, and what the rows are."""

    features_of: Features
    labels: torch.Tensor  # [N * V] int64
    paths: list[bytes]
    raw_labels: np.ndarray  # [N] int8, -1 unlabeled
    views: int
    dim: int
    provenances: list[str]  # one per cache (an ensemble has several)
    caches: list[Path]
    weights_paths: list[str] = field(default_factory=list)  # per cache: where a --weights FILE was
    streamed: Streamed | None = None
    missing: list[str] = field(default_factory=list)  # images present in only some of the caches


def load(caches: list[Path], cfg: FitConfig, budget: int, stack: contextlib.ExitStack) -> Data:
    """One cache: in memory when it fits the budget, else streamed (the handle stays open in `stack`). Several
    caches (an ensemble): the features of the images they share, side by side, in memory."""
    opened = [stack.enter_context(open_cache(c)) for c in caches]
    f, index = opened[0]
    labeled_rows(index, caches[0])
    if len(caches) == 1:
        n, dim = index.shape[0], index.shape[2]
        v = cfg.views_of(index) if cfg.augment else 1
        data = Data(None, torch.from_numpy(index.labels.astype(np.int64)).repeat_interleave(v), index.paths,
                    index.labels, v, dim, [index.provenance.to_json()], caches, [index.weights_path])
        if n * v * dim * 4 <= budget:
            x_np = read_features(f, view=None if cfg.augment else 0)
            check_finite(x_np, str(caches[0]))
            data.features_of = Gather(torch.from_numpy(x_np).reshape(n * v, -1))  # [N*V, D]
        elif cfg.augment:
            raise InputError("--augment needs every view in memory; raise --max-memory or fit without --augment")
        else:
            data.streamed = data.features_of = Streamed(f, budget, str(caches[0]))
        return data
    if cfg.augment:
        raise InputError("--augment with several caches is not supported: fit an ensemble on center views")
    keys = [dict(zip(ix.keys(), range(ix.shape[0]), strict=True)) for _, ix in opened]
    shared = [k for k in keys[0] if all(k in other for other in keys[1:])]  # the first cache's order
    missing = sorted({os.fsdecode(k[1]) for ks in keys for k in ks if k not in keys[0] or any(
        k not in other for other in keys[1:])})
    if not shared:
        raise InputError(f"the caches {', '.join(map(str, caches))} share no image (same folder and file name)")
    dims = [ix.shape[2] for _, ix in opened]
    if len(shared) * sum(dims) * 4 > budget:
        raise InputError("an ensemble is fitted in memory: raise --max-memory")
    parts = []
    for (g, ix), ks, c in zip(opened, keys, caches, strict=True):
        rows = np.array([ks[k] for k in shared])
        x_np = read_features(g)[rows]  # [N, D_i]
        check_finite(x_np, str(c))
        labels_i = ix.labels[rows]
        if not np.array_equal(labels_i, index.labels[[keys[0][k] for k in shared]]):
            raise InputError(f"{c} labels some images differently from {caches[0]}: refusing to join them")
        parts.append(x_np)
    lab = index.labels[[keys[0][k] for k in shared]]
    x = torch.from_numpy(np.concatenate(parts, axis=1))  # [N, sum of D]
    return Data(Gather(x), torch.from_numpy(lab.astype(np.int64)), [k[1] for k in shared], lab, 1, x.shape[1],
                [ix.provenance.to_json() for _, ix in opened], caches, [ix.weights_path for _, ix in opened], None,
                missing)


def fold_of(paths: list[bytes], k: int, seed: int) -> np.ndarray:
    """Fold of each row for --folds: the same hash of (seed, path) as the validation split, cut in k equal parts
    (adding images never moves an existing one to another fold)."""
    return np.minimum((path_hash(paths, seed) * k).astype(np.int64), k - 1)


def cross_fit(data: Data, cfg: FitConfig, k: int, on_fold: Callable[[int, float, float], None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """K-fold cross-fitting: each labeled row is predicted by a head that never saw it. Returns the out-of-fold
    logits [n, 2], their labels [n] and each fold's best epoch (by its held-out log loss)."""
    labeled = np.flatnonzero(data.raw_labels >= 0)
    fold = fold_of([data.paths[i] for i in labeled], k, cfg.seed)
    v = data.views
    oof, ys, best = [], [], []
    for j in range(k):
        held, rest = labeled[fold == j], labeled[fold != j]
        if not len(held) or len(set(data.raw_labels[rest].tolist())) < 2:
            raise InputError(f"--folds {k}: fold {j + 1} leaves too few images; use fewer folds")
        tr = torch.from_numpy((rest[:, None] * v + np.arange(v)).ravel())
        va = torch.from_numpy(held * v)
        head, history, _ = train(data.features_of, data.labels, tr, va, cfg, None, data.dim)
        loss, acc, logits = evaluate(head, data.features_of, data.labels, va)
        best.append(min(history, key=lambda h: h.val_loss).epoch)
        oof.append(logits)
        ys.append(data.labels[va])
        if on_fold:
            on_fold(j + 1, loss, acc)
    return torch.cat(oof), torch.cat(ys), best


def fit(cache: str | os.PathLike[str] | list, head_path: str | os.PathLike[str] | None, cfg: FitConfig,
        on_epoch: Callable[[EpochStats], None] | None = None, max_memory: str | None = None,
        calibrate_head: bool = False, curve: bool = True, folds: int = 0,
        on_fold: Callable[[int, float, float], None] | None = None, budget_bytes: int | None = None) -> FitReport:
    """Train on the cache: in memory when the feature matrix fits the budget (default: half the available memory),
    streamed from HDF5 otherwise; the same batches, hence the same head, either way. Several caches: one head on
    their features side by side (an ensemble of backbones or layers). folds=K: out-of-fold metrics and calibration,
    then the head is trained on every labeled row."""
    cfg.check()
    caches = as_paths(cache)
    if len(set(c.resolve() for c in caches)) != len(caches):
        raise InputError("--cache: the same cache given twice")
    if folds and not 2 <= folds <= 50:
        raise InputError(f"--folds must be between 2 and 50, got {folds}")
    head_path = Path(head_path) if head_path else default_head_path(caches[0])
    curve_path = head_path.with_suffix(".png") if curve else None
    check_outputs({"--head": head_path, "the training curve": curve_path},
                  {f"--cache {c}": c for c in caches})
    # budget_bytes: an exact budget for verify and tests (below --max-memory's 1M floor: always streamed)
    budget = budget_bytes or (parse_size(max_memory) if max_memory else available_memory() // 2)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:  # cache handles stay open while streaming
        data = load(caches, cfg, budget, stack)
        load_seconds = time.perf_counter() - t0
        oof_note: dict[str, Any] = {}
        if folds:
            logits, y, best_epochs = cross_fit(data, cfg, folds, on_fold)
            final_cfg = replace(cfg, val_fraction=0.0, keep="last",
                                epochs=int(np.median(best_epochs)) if cfg.keep == "best" else cfg.epochs)
            train_np = np.flatnonzero(data.raw_labels >= 0)
            train_rows = torch.from_numpy((train_np[:, None] * data.views + np.arange(data.views)).ravel())
            head, history, kept = train(data.features_of, data.labels, train_rows, torch.zeros(0, dtype=torch.long),
                                        final_cfg, on_epoch, data.dim)
            n_train, n_val = len(train_np), len(y)
            oof_note = {"folds": folds, "best_epochs": best_epochs, "final_epochs": final_cfg.epochs}
        else:
            train_np, val_np = split(data.paths, data.raw_labels, cfg.val_fraction, cfg.seed)
            # Row r's view j is feature row r * V + j: every view of a training image trains, validation sees the
            # center view.
            train_rows = torch.from_numpy((train_np[:, None] * data.views + np.arange(data.views)).ravel())
            val_rows = torch.from_numpy(val_np * data.views)  # [n_val]
            head, history, kept = train(data.features_of, data.labels, train_rows, val_rows, cfg, on_epoch, data.dim)
            _, _, logits = evaluate(head, data.features_of, data.labels, val_rows)
            y = data.labels[val_rows]
            n_train, n_val = len(train_np), len(val_rows)
    probs = logits.softmax(1)
    y_val, pred = y.numpy(), probs.argmax(1).numpy()
    calibration = {"temperature": 1.0, "clip": 0.0}
    if calibrate_head:
        if len(y) < 2:
            raise InputError("--calibrate needs a validation split: raise --val-fraction (or use --folds)")
        calibration = calibrate(logits, y)
    confusion = [[int(((y_val == t) & (pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    acc = float((pred == y_val).mean()) if len(y_val) else float("nan")
    report = FitReport(head_path, history, n_train, n_val, 0.0, load_seconds,
                       log_loss(probs[:, 1].numpy(), y_val), acc, confusion,
                       streamed=data.streamed is not None, calibration=calibration if calibrate_head else {},
                       kept_epoch=kept, head_shape=head.describe(), folds=oof_note, missing=data.missing,
                       unlabeled=int((data.raw_labels < 0).sum()))
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise Diverged("training produced NaN or infinite weights: lower --lr; no head saved")
    save_head(head_path, head, {
        "provenance": data.provenances[0],
        "ensemble": data.provenances if len(caches) > 1 else [],
        "config": {**asdict(cfg), "hidden": list(cfg.hidden)},
        "cache": str(caches[0].resolve()),
        "caches": [str(c.resolve()) for c in caches],
        "weights_path": data.weights_paths[0],
        "weights_paths": data.weights_paths,
        "history": [asdict(h) for h in history],
        "kept_epoch": kept,
        "metrics": {"val_log_loss": report.val_log_loss, "val_acc": report.val_acc, "confusion": confusion,
                    "n_train": report.n_train, "n_val": report.n_val, **oof_note},
        "temperature": calibration["temperature"],
        "clip": calibration["clip"],
    })
    if curve_path:
        from .plots import training_curve

        report.curve = training_curve(history, curve_path, kept_epoch=kept)
    report.seconds = time.perf_counter() - t0
    return report
