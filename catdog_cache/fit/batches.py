"""The one batch order, in memory or streamed."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..cache import CHUNK_ROWS

WINDOW_CHUNKS = 8  # batch order: 8 random 64-row chunks (512 rows) are shuffled together; see windowed_batches


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
