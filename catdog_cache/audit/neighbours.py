"""Blockwise cosine top-k: every row's k most similar rows, within one cache or from one cache into another, with
memory bounded by a budget whatever the row count. A block of rows against a block of rows is one matrix product
([b, D] @ [D, b]); only each row's best k survive a block, so the N x N similarity matrix never exists."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import CHUNK_ROWS, BlockReader, View
from ..errors import InputError

# What a row costs beside the features: its k sims and ids (float32 + int64) twice over (the state and the merge's
# concatenation), rounded up; and the open index of a cache (paths and sha256 as Python objects, ~280 bytes a row
# measured for fit's full open, rounded up).
INDEX_ROW_BYTES = 400


@dataclass
class Neighbours:
    """Each query row's k most similar rows, most similar first; -inf / -1 where fewer than k exist."""

    sims: np.ndarray  # [N, k] float32 cosine
    idx: np.ndarray  # [N, k] int64 row numbers in the reference rows


@dataclass
class Plan:
    block_rows: int
    in_memory: bool  # every feature row held once (no reread per block pair)


def state_bytes(n: int, k: int) -> int:
    return n * k * 12 * 2


def pair_bytes(b: int, dim: int) -> int:
    """A block pair's peak: two [b, D] feature blocks and the [b, b] similarity block, twice (its transposed top-k)."""
    return 2 * b * dim * 4 + 2 * b * b * 4


def plan(n_query: int, n_ref: int, dim: int, k: int, budget: int, what: str) -> Plan:
    """Block size and whether the features are held whole, for a search of n_query rows against n_ref rows under
    `budget` bytes: the state and the indexes first; then the features whole if they take at most half of what is
    left and a pair of 64-row blocks still fits beside them (each block pair is then a slice, not a read); then the
    largest block of whole 64-row chunks whose pair fits."""
    fixed = state_bytes(n_query + n_ref, k) + INDEX_ROW_BYTES * (n_query + n_ref)
    rest = budget - fixed
    feats = (n_query + n_ref) * dim * 4
    in_memory = feats <= rest // 2 and rest - feats >= pair_bytes(CHUNK_ROWS, dim)
    if in_memory:
        rest -= feats
    # 2 b D 4 + 2 b^2 4 <= rest  ->  b^2 + b D - rest / 8 <= 0
    b = int((-dim + math.sqrt(dim * dim + rest / 2)) / 2) if rest > 0 else 0
    b = min(b // CHUNK_ROWS * CHUNK_ROWS, -(-max(n_query, n_ref, 1) // CHUNK_ROWS) * CHUNK_ROWS)
    if b < CHUNK_ROWS:
        need = fixed + pair_bytes(CHUNK_ROWS, dim)
        raise InputError(f"--max-memory: the {what} search over {n_query + n_ref:,} rows needs at least "
                         f"{-(-need // 2**20)}M (each row's best {k} and the index, and one pair of 64-row blocks)")
    return Plan(b, in_memory)


class Blocks:
    """Rows of features, L2-normalised, served in blocks on `device`: sliced from memory when the plan holds them
    whole, else read block by block from the cache. Raw cosine, not centred: what a threshold means then does not
    depend on which rows a cache holds (docs/audit.md measured both)."""

    def __init__(self, source: View | np.ndarray, block_rows: int, in_memory: bool, device: torch.device) -> None:
        self.device = device
        self.block_rows = max(CHUNK_ROWS, block_rows // CHUNK_ROWS * CHUNK_ROWS)
        self._reader: BlockReader | None = None
        self._all: torch.Tensor | None = None
        if isinstance(source, np.ndarray):
            self.rows, self.dim = source.shape
            self._all = self._normalised(torch.from_numpy(np.ascontiguousarray(source, np.float32)))
        else:
            self._reader = BlockReader(source, self.block_rows)
            self.rows, self.dim = self._reader.rows, self._reader.dim
            if in_memory:
                self._all = torch.cat([self._normalised(torch.from_numpy(self._reader.block(b)))
                                       for b in range(self._reader.blocks)]) if self.rows else \
                    torch.zeros(0, self.dim, device=device)
        self.blocks = -(-self.rows // self.block_rows)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)  # [b, D]
        if not torch.isfinite(x).all():
            raise InputError("the cache holds NaN or infinite features: extract again (or with --precision fp32)")
        return torch.nn.functional.normalize(x, dim=1)  # a zero row stays zero: cosine 0 with everything

    def block(self, b: int) -> torch.Tensor:
        """[rows of block b, D] float32, unit rows."""
        lo = b * self.block_rows
        if self._all is not None:
            return self._all[lo : lo + self.block_rows]
        assert self._reader is not None
        return self._normalised(torch.from_numpy(self._reader.block(b)))


def _top(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best min(k, columns) of a similarity block: ([b, k'] sims, [b, k'] column)."""
    return s.topk(min(k, s.shape[1]), dim=1)


class TopK:
    """The running best k (sims, ids) of each of n rows, merged block by block."""

    def __init__(self, n: int, k: int, device: torch.device) -> None:
        self.k = k
        self.sims = torch.full((n, k), -math.inf, device=device)
        self.idx = torch.full((n, k), -1, dtype=torch.long, device=device)

    def merge(self, lo: int, sims: torch.Tensor, idx: torch.Tensor) -> None:
        hi = lo + sims.shape[0]
        s = torch.cat([self.sims[lo:hi], sims], 1)  # [b, k + k']
        i = torch.cat([self.idx[lo:hi], idx], 1)
        top, pos = s.topk(self.k, dim=1)
        self.sims[lo:hi] = top
        # a -inf is no neighbour (a row's own diagonal, in a block of fewer than k columns): no id either
        self.idx[lo:hi] = torch.where(torch.isneginf(top), -1, i.gather(1, pos))

    def result(self) -> Neighbours:
        return Neighbours(self.sims.cpu().numpy(), self.idx.cpu().numpy())


def within(blocks: Blocks, k: int, progress: Callable[[int, int], None] | None = None) -> Neighbours:
    """Each row's k most similar other rows of the same set. Each unordered block pair is multiplied once (the
    upper triangle): the product's rows update the first block's rows, its columns the second's."""
    state = TopK(blocks.rows, k, blocks.device)
    total, done = blocks.blocks * (blocks.blocks + 1) // 2, 0
    for qb in range(blocks.blocks):
        q = blocks.block(qb)  # [bq, D]
        q_lo = qb * blocks.block_rows
        for rb in range(qb, blocks.blocks):
            r = q if rb == qb else blocks.block(rb)  # [br, D]
            r_lo = rb * blocks.block_rows
            s = q @ r.T  # [bq, br] cosine
            if rb == qb:
                s.fill_diagonal_(-math.inf)  # a row is not its own neighbour
            top, col = _top(s, k)
            state.merge(q_lo, top, col + r_lo)
            if rb != qb:
                # [br, k']: the second block's rows against the first's (a contiguous copy: top-k along rows of
                # the copy measured 1.6x faster than along the strided columns; the plan counts the copy)
                top, col = _top(s.T.contiguous(), k)
                state.merge(r_lo, top, col + q_lo)
            del s
            done += 1
            if progress:
                progress(done, total)
    return state.result()


def across(queries: Blocks, refs: Blocks, k: int, progress: Callable[[int, int], None] | None = None) -> Neighbours:
    """Each query row's k most similar reference rows (another cache's rows against the audited cache)."""
    state = TopK(queries.rows, k, queries.device)
    total, done = queries.blocks * refs.blocks, 0
    for qb in range(queries.blocks):
        q = queries.block(qb)  # [bq, D]
        for rb in range(refs.blocks):
            top, col = _top(q @ refs.block(rb).T, k)  # [bq, k']
            state.merge(qb * queries.block_rows, top, col + rb * refs.block_rows)
            done += 1
            if progress:
                progress(done, total)
    return state.result()
