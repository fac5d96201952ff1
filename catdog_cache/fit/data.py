"""Features for training: in memory, streamed from HDF5 when larger than the budget, or several caches joined."""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import CHUNK_ROWS, BlockReader, Index, open_cache, read_features
from ..cache.packed_index import PackedPaths
from ..errors import InputError
from .ahead import take
from .config import Features, FitConfig


def labeled_rows(index: Index, cache: Path) -> np.ndarray:
    partial = (f"; its extraction of {', '.join(index.incomplete)} was interrupted: run extract again to finish it"
               if index.incomplete else "")
    if index.shape[0] == 0:
        raise InputError(f"{cache} is empty (0 rows; an extract interrupted before its first batch?): run extract"
                         + partial)
    rows = np.flatnonzero(index.labels >= 0)
    classes = set(index.labels[rows].tolist())
    if len(classes) < 2:
        have = ", ".join(index.classes[c] for c in sorted(classes)) or "no labels"
        if index.classes == ["cat", "dog"] or not index.classes:
            raise InputError(f"{cache} needs labeled cats and dogs to fit, and holds {have}: extract a folder with "
                             "cat/ and dog/ sub-folders (or one sub-folder per class) or cat.N.jpg / dog.N.jpg files"
                             + partial)
        raise InputError(f"{cache} needs labeled images of at least two classes to fit, and holds {have}: extract "
                         "a folder with one sub-folder per class" + partial)
    return rows


def check_finite(x: np.ndarray, where: str) -> None:
    # A float64 sum is one pass without a temporary (0.05 s for 400 MB, 10x less than isfinite().all()): any NaN or
    # inf makes it non-finite, and float32 values cannot overflow it, so a finite total proves every value finite.
    if not np.isfinite(x.sum(dtype=np.float64)):
        raise InputError(f"{where} holds NaN or infinite features: extract again (or with --precision fp32)")


class Gather:
    """Row lookups into the in-memory feature matrix, written into reused buffers: a fresh 2 MB tensor per step
    costs more in page faults than the copy itself. A result is valid for `ring` calls with as many rows (1, or
    ahead.RING while batches are prepared ahead). The matrix may live on a training device (fit --device cuda):
    rows from anywhere, results on `device`."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x  # [N, D]
        self.device = x.device
        self.ring = 1
        self._out: dict[int, list[torch.Tensor]] = {}
        self._turn: dict[int, int] = {}

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out = take(self._out, self._turn, len(rows), self.ring,
                   lambda: torch.empty(len(rows), self.x.shape[1], device=self.device))
        return torch.index_select(self.x, 0, rows.to(self.device), out=out)  # [B, D]; .to: no-op on the host


def on_device(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """The feature matrix on the training device, uploaded once, when it takes at most half the device's free memory
    (the rest is for the batches, masks and head); else it stays on the host and each batch is copied over. Where
    the features live never changes the head, only the speed."""
    if device is None or device.type != "cuda":
        return x.to(device) if device is not None else x
    free, _ = torch.cuda.mem_get_info(device)
    return x.to(device) if x.numel() * x.element_size() <= free // 2 else x


class Streamed:
    """Caches larger than memory: the rows of each batch are looked up in whole 64-row chunks read from HDF5 and
    kept in a small least-recently-used set sized by the budget. The batch order (windowed_batches) visits the
    chunks one window at a time, so each chunk is read once per epoch and reads stay 1 MiB-sequential. The budget
    changes only what is cached, never which rows form a batch: heads are identical for any --max-memory.
    The cached chunks live in slots of one preallocated slab (pages untouched until a chunk lands there), so a
    batch is one index_select: a scatter per chunk (out[sel] = ...) cost 30-70 ms per batch on this CPU."""

    def __init__(self, f, budget: int, where: str) -> None:
        self.reader = BlockReader(f, CHUNK_ROWS)  # one chunk per block
        self.where = where
        chunk_bytes = CHUNK_ROWS * self.reader.dim * 4
        self.capacity = max(2, budget // chunk_bytes)  # two windows fit in 16 MiB at 4096-d: one read per chunk
        self.capacity = min(self.capacity, self.reader.blocks or 1)  # never more slots than the cache has chunks
        self._slab = torch.empty(self.capacity * CHUNK_ROWS, self.reader.dim)  # [slots * 64, D]
        self._slab_np = self._slab.numpy()  # the same memory: chunks are read straight into their slot
        self._view = f
        self._slots: OrderedDict[int, int] = OrderedDict()  # chunk -> slot, least recently used first
        self._out: dict[int, torch.Tensor] = {}  # batch size -> reused result (as Gather: a fresh one per step
        # fragmented the heap: RSS grew by about a batch per step until the epoch ended, 3.5 GB at 1M rows)

    def slot(self, c: int) -> int:
        s = self._slots.get(c)
        if s is None:
            s = self._slots.popitem(last=False)[1] if len(self._slots) >= self.capacity else len(self._slots)
            lo = c * CHUNK_ROWS
            n = min(CHUNK_ROWS, self.reader.rows - lo)
            block = self._view.read(lo, lo + n, 0, out=self._slab_np[s * CHUNK_ROWS : s * CHUNK_ROWS + n])  # [n, D]
            check_finite(block, self.where)  # (a failure ends the fit: the slot table need not survive it)
            self._slots[c] = s
        else:
            self._slots.move_to_end(c)
        return s

    def chunk(self, c: int) -> torch.Tensor:
        """[<=64, D] chunk c (a view into the slab, valid until the chunk is evicted)."""
        s = self.slot(c)
        return self._slab[s * CHUNK_ROWS : s * CHUNK_ROWS + min(CHUNK_ROWS, self.reader.rows - c * CHUNK_ROWS)]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        ids, inv = torch.unique(rows // CHUNK_ROWS, return_inverse=True)  # [U] chunks, [B] which of them
        ids_l = ids.tolist()
        missing = [c for c in ids_l if c not in self._slots]
        if len(missing) > 1:  # the disk reads them together (a window's first batch misses ~8 chunks)
            for c in missing:
                self._view.prefetch(c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS)
        if len(ids_l) <= self.capacity:  # the common case: every chunk of the batch held at once
            slots = torch.tensor([self.slot(c) for c in ids_l], dtype=torch.long)  # [U]
            out = self._out.get(len(rows))
            if out is None:
                out = self._out[len(rows)] = torch.empty(len(rows), self.reader.dim)  # [B, D]
            # valid until the next call with as many rows (as Gather's)
            return torch.index_select(self._slab, 0, slots[inv] * CHUNK_ROWS + rows % CHUNK_ROWS, out=out)
        out = torch.empty(len(rows), self.reader.dim)  # [B, D]: a tiny budget, one chunk at a time
        for j, c in enumerate(ids_l):
            sel = torch.nonzero(inv == j).flatten()
            s = self.slot(c)
            out.index_copy_(0, sel, torch.index_select(self._slab, 0, s * CHUNK_ROWS + rows[sel] % CHUNK_ROWS))
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


# Bytes a row that a plain fit holds beside the features and the index, at its peak (the epoch's shuffle): int64
# labels, the train/validation rows, the epoch's order and the shuffle's temporaries. Measured 33.7 at 1M rows
# (peak RSS growth at 1M minus 100k rows, minus the index's, glibc's mmap threshold pinned so freed arrays leave);
# rounded up for the split's transient hash and --folds' out-of-fold logits.
FIT_ROW_BYTES = 40


def index_bytes(index: Index) -> int:
    """What the open index holds in memory, measured against RSS: the lean open's packed paths, labels and
    folders (1M rows: 22.9 MiB of arrays, 30 MiB of RSS; 10M: 229 and 264), x1.25 for the allocator and the
    shards' records. A full open's lists of Python objects: ~280 bytes a row."""
    paths = index.paths.nbytes() if isinstance(index.paths, PackedPaths) else 280 * len(index.paths)
    return int((paths + index.labels.nbytes + np.asarray(index.source).nbytes) * 1.25)


def fit_overhead(index: Index) -> int:
    """What --max-memory must hold beside the features: the open index and fit's per-row arrays."""
    return index_bytes(index) + FIT_ROW_BYTES * index.shape[0]


def mib(n: int) -> str:
    """Bytes as --max-memory takes them, rounded up: '669M' (no thousands separator: the text is meant to be
    pasted back into --max-memory, and parse_size reads no commas)."""
    return f"{-(-n // 2**20)}M"


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


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
    sources: list[str] = field(default_factory=list)  # the folders of the labeled rows: what training sees
    classes: list[str] = field(default_factory=lambda: ["cat", "dog"])  # label i means classes[i]: the head's outputs


def load(caches: list[Path], cfg: FitConfig, budget: int, stack: contextlib.ExitStack,
         device: torch.device | None = None, strict_budget: bool = False) -> Data:
    """One cache: in memory when it fits the budget, else streamed (the handle stays open in `stack`). Several
    caches (an ensemble): the features of the images they share, side by side, in memory. The budget is host
    memory; with a training device, in-memory features are uploaded to it once (on_device), streamed ones per batch.
    strict_budget: a budget the user gave (--max-memory), refused when the rows alone would exceed it; the default
    (half the available memory) and verify's 1-byte budget stream with two chunks instead."""
    opened = [stack.enter_context(open_cache(c, lean=True)) for c in caches]  # paths packed, no sha256/stat
    f, index = opened[0]
    labeled_rows(index, caches[0])
    if len(caches) == 1:
        n, dim = index.shape[0], index.shape[2]
        v = cfg.views_of(index) if cfg.augment else 1
        labels = torch.from_numpy(index.labels.astype(np.int64))  # [N]
        data = Data(None, labels.repeat_interleave(v) if v > 1 else labels, index.paths,
                    index.labels, v, dim, [index.provenance.to_json()], caches, [index.weights_path],
                    sources=[index.sources[s] for s in np.unique(index.source[index.labels >= 0]).tolist()],
                    classes=index.classes)
        # --max-memory covers the features and what grows with the rows beside them (fit_overhead); left out, it
        # was 0.9 GB past a 256M budget at 10M rows. What stays constant is not counted (the runtime, ~45 MiB, and
        # one validation batch, 4096 x D floats).
        rest = fit_overhead(index)
        if n * v * dim * 4 + rest <= budget:
            x_np = read_features(f, view=None if cfg.augment else 0)
            check_finite(x_np, str(caches[0]))
            data.features_of = Gather(on_device(torch.from_numpy(x_np).reshape(n * v, -1), device))  # [N*V, D]
        elif cfg.augment:
            raise InputError("--augment needs every view in memory; raise --max-memory or fit without --augment")
        else:
            slots = 2 * CHUNK_ROWS * dim * 4  # the least streaming holds, whatever the budget: two 64-row chunks
            if rest > budget and strict_budget:
                raise InputError(f"--max-memory {mib(budget)}: fitting {n:,} rows of {caches[0]} needs {mib(rest)} "
                                 "beside the features (the open index and fit's per-row arrays); give at least "
                                 f"{mib(rest + slots)}")
            data.streamed = data.features_of = Streamed(f, budget - rest, str(caches[0]))
        return data
    v = 1
    if cfg.augment:  # view j of every cache side by side: the same flip of the same image (predict --tta joins so)
        v = cfg.views_of(index)
        for (_, ix), c in zip(opened[1:], caches[1:], strict=True):
            if ix.provenance.views != index.provenance.views:
                raise InputError(f"--augment: {c} holds the views {ix.provenance.views}, {caches[0]} holds "
                                 f"{index.provenance.views}; extract both with the same --views")
    for (_, ix), c in zip(opened[1:], caches[1:], strict=True):
        if ix.classes != index.classes:  # the same label number must name the same class in every cache
            raise InputError(f"{c} has the classes {', '.join(ix.classes) or 'none'}, {caches[0]} has "
                             f"{', '.join(index.classes)}: an ensemble joins caches of the same classes")
    keys = [dict(zip(ix.keys(), range(ix.shape[0]), strict=True)) for _, ix in opened]
    shared = [k for k in keys[0] if all(k in other for other in keys[1:])]  # the first cache's order
    missing = sorted({os.fsdecode(k[1]) for ks in keys for k in ks if k not in keys[0] or any(
        k not in other for other in keys[1:])})
    if not shared:
        raise InputError(f"the caches {', '.join(map(str, caches))} share no image (same folder and file name)")
    dims = [ix.shape[2] for _, ix in opened]
    if len(shared) * v * sum(dims) * 4 > budget:
        raise InputError("an ensemble is fitted in memory: raise --max-memory")
    parts = []
    for (g, ix), ks, c in zip(opened, keys, caches, strict=True):
        rows = np.array([ks[k] for k in shared])
        x_np = read_features(g, view=None if cfg.augment else 0)[rows]  # [N, D_i], or [N, V, D_i] with --augment
        check_finite(x_np, str(c))
        labels_i = ix.labels[rows]
        if not np.array_equal(labels_i, index.labels[[keys[0][k] for k in shared]]):
            raise InputError(f"{c} labels some images differently from {caches[0]}: refusing to join them")
        parts.append(x_np)
    lab = index.labels[[keys[0][k] for k in shared]]
    x = torch.from_numpy(np.concatenate(parts, axis=-1)).reshape(len(shared) * v, -1)  # [N * V, sum of D]
    return Data(Gather(on_device(x, device)), torch.from_numpy(lab.astype(np.int64)).repeat_interleave(v),
                [k[1] for k in shared], lab, v, x.shape[1],
                [ix.provenance.to_json() for _, ix in opened], caches, [ix.weights_path for _, ix in opened], None,
                missing, sorted({k[0] for k, y in zip(shared, lab.tolist(), strict=True) if y >= 0},
                                key=index.sources.index), index.classes)
