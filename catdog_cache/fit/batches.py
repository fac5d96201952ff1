"""The one batch order, in memory or streamed."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..cache import CHUNK_ROWS

WINDOW_CHUNKS = 8  # batch order: 8 random 64-row chunks (512 rows) are shuffled together; see windowed_batches


def windowed_batches(train_rows: torch.Tensor, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """The epoch's batches: consecutive batch_size slices of epoch_order (the last may be short)."""
    order = epoch_order(train_rows, g)  # [n_train]
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]  # [B]


def epoch_order(train_rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The one batch order, defined by the seed and the cache alone (never by the memory budget): each epoch the
    64-row chunks that hold training rows are put in random order, taken WINDOW_CHUNKS at a time, and the rows of
    each window are shuffled together. In memory or streamed from disk, fit sees the same batches, and a streamed
    epoch reads each 1 MiB chunk once. A window mixes 8 chunks from anywhere in the file, so batches mix classes
    even when the rows are sorted (Kaggle names: all cats, then all dogs)."""
    # Only `order` lives through the epoch (8 bytes a training row); the rest is freed, or reused in place, before
    # the first batch (at 10M rows the generator's frame held ~30 bytes a row of temporaries for the whole epoch).
    chunk = train_rows // CHUNK_ROWS  # [n_train]
    ids = torch.unique(chunk)  # [C] sorted
    rank = torch.empty(int(ids[-1]) + 1 if len(ids) else 0, dtype=torch.long)
    rank[ids[torch.randperm(len(ids), generator=g)]] = torch.arange(len(ids))  # chunk id -> position this epoch
    del ids
    key = rank[chunk]  # [n_train]
    del chunk, rank
    key //= WINDOW_CHUNKS  # the window of each row
    key *= len(train_rows)
    key += torch.randperm(len(train_rows), generator=g)  # [n_train] uniform order within a window: keys unique
    return train_rows[torch.argsort(key)]  # [n_train]


def feature_rows(rows: np.ndarray, views: int, every_view: bool = True) -> torch.Tensor:
    """Cache rows [n] -> feature rows: row r's view j is feature row r * V + j. Every view of a training image trains
    ([n * V]); validation sees the center view ([n], every_view=False). One view: the same memory, no copy (at 10M
    rows each copy is 80 MB)."""
    if views == 1:
        return torch.from_numpy(rows)
    if not every_view:
        return torch.from_numpy(rows * views)
    return torch.from_numpy((rows[:, None] * views + np.arange(views)).ravel())
