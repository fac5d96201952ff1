"""Feature rows read straight from a shard file with pread, past HDF5: a streamed epoch over thousands of shards.

A streamed fit reads 64-row chunks in random order across every shard. Through HDF5 each read needs the shard's file
open, and an open HDF5 file holds hundreds of KiB, so a reader keeps 64 and reopens (about a millisecond, tens of us
a row; docs/scale.md) for nearly every chunk of a cache of more shards. Our writer stores features unfiltered, in
whole-row chunks (validate's check of chunks) or contiguous, so a row range is a byte range: the shard's chunk map
(where each chunk starts) is read once, checked like everything else in the file, and later reads are one pread
each, through a pool of plain file descriptors (no HDF5 state: thousands cost nothing). Anything this does not cover
(another byte order, several views, a chunk never written) falls back to HDF5, which reads it as before."""

from __future__ import annotations

import os
import stat
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from .opening import open_h5_fd

MAX_FDS = 1024  # descriptors held open by one reader (each is a kernel file handle, no HDF5 state)


@dataclass
class ChunkMap:
    """Where a shard's feature rows lie: chunk k (rows [k*rows, (k+1)*rows)) starts at byte starts[k] (contiguous
    storage: one chunk of every row)."""

    starts: np.ndarray  # [K] int64 byte offsets
    rows: int  # rows per chunk
    row_bytes: int
    dtype: np.dtype


def identity(st: os.stat_result) -> tuple[int, int, int]:
    """What says a shard is still the file validated at open (shards are written once: a rename or a rewrite in
    place changes it even where the size is the same)."""
    return st.st_dev, st.st_ino, st.st_mtime_ns


def chunk_map(path: Path, n: int, size: int, fd: int | None = None) -> ChunkMap | None:
    """The map of a shard of `n` rows whose file has `size` bytes, or None where this reader does not apply.
    Every offset comes from a file that may be crafted: each chunk must be whole, unfiltered, inside the file, at a
    row boundary, and every chunk present exactly once. `fd`: the descriptor the rows will be read through; the map
    must come from that same file (a swap between the two opens would apply one file's offsets to another)."""
    if sys.byteorder != "little" or not hasattr(os, "preadv") or n == 0:
        return None
    # through the descriptor the rows are read from (opening.open_h5_fd: that very file, no second lookup by name)
    with open_h5_fd(fd, path, rdcc_nbytes=0) if fd is not None else h5py.File(path, "r", rdcc_nbytes=0) as f:
        ds = f["features"].id  # validated when the view was built (validate.file_index)
        dtype = ds.dtype
        _, v, d = ds.shape
        if ds.shape[0] != n:
            raise CacheError(f"{path} changed while reading: run again")
        if v != 1 or dtype.byteorder not in ("<", "=") or dtype not in (np.float16, np.float32):
            return None
        row_bytes = v * d * dtype.itemsize
        dcpl = ds.get_create_plist()
        if dcpl.get_nfilters():  # validation refuses filters already; stored bytes are not rows under any filter
            return None
        if dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
            start = ds.get_offset()
            if start is None or start + n * row_bytes > size:
                return None  # never written (HDF5 reads its fill value) or not ours
            return ChunkMap(np.array([start], np.int64), n, row_bytes, dtype)
        if dcpl.get_layout() != h5py.h5d.CHUNKED or not hasattr(ds, "chunk_iter"):  # chunk_iter: h5py >= 3.8
            return None
        r = dcpl.get_chunk()[0]
        k = -(-n // r)
        starts = np.full(k, -1, np.int64)
        bad: list[str] = []

        def visit(ci: h5py.h5d.StoreInfo) -> None:
            c = ci.chunk_offset[0] // r
            if ci.filter_mask or ci.size != r * row_bytes or ci.chunk_offset[0] % r or any(ci.chunk_offset[1:]) \
                    or not 0 <= c < k or starts[c] >= 0 or ci.byte_offset is None or \
                    not 0 <= ci.byte_offset <= size - ci.size:
                bad.append(str(ci.chunk_offset))
            else:
                starts[c] = ci.byte_offset

        ds.chunk_iter(visit)
    if bad:
        raise CacheError(f"{path}: features chunk {bad[0]} is not stored as catdog-cache stores it; refusing a "
                         "crafted cache")
    return ChunkMap(starts, r, row_bytes, dtype) if (starts >= 0).all() else None


class Direct:
    """One reader's chunk maps and descriptors. read() returns False where the caller must read through HDF5."""

    def __init__(self, shards: list[Path], shard_bytes: list[int],
                 shard_ids: list[tuple[int, int, int]] | None = None) -> None:
        self.shards, self.shard_bytes = shards, shard_bytes
        # identity() of each shard: as validated when the view was built, else as first opened here
        self._ids: dict[int, tuple[int, int, int]] = dict(enumerate(shard_ids or []))
        self._maps: dict[int, ChunkMap | None] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()

    def fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is not None:
            self._fds.move_to_end(i)
            return fd
        if len(self._fds) >= MAX_FDS:
            os.close(self._fds.popitem(last=False)[1])
        try:
            # O_NONBLOCK: a FIFO put in a shard's place opens at once (and is refused below) instead of hanging
            fd = os.open(self.shards[i], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            raise CacheError(f"{self.shards[i]} vanished or changed while reading (a compact or a new extract?): "
                             "run again") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (i < len(self.shard_bytes) and st.st_size != self.shard_bytes[i]) \
                or self._ids.setdefault(i, identity(st)) != identity(st):
            os.close(fd)
            raise CacheError(f"{self.shards[i]} changed while reading: run again")
        self._fds[i] = fd
        return fd

    def map(self, i: int, rows: int) -> ChunkMap | None:
        if i not in self._maps:
            # the descriptor first: the map is then checked to come from the file it reads
            self._maps[i] = chunk_map(self.shards[i], rows, self.shard_bytes[i], self.fd(i)) \
                if i < len(self.shard_bytes) else None
        return self._maps[i]

    def advise(self, i: int, rows: int, r0: int, n: int) -> None:
        """Ask the kernel to start reading rows [r0, r0 + n) of shard i now (POSIX_FADV_WILLNEED): the chunks of a
        batch are then read from disk together rather than one synchronous pread after another (a cache larger
        than memory, random chunks: one read in flight at a time leaves the disk mostly idle)."""
        m = self.map(i, rows)
        if m is None or not hasattr(os, "posix_fadvise"):
            return
        fd = self.fd(i)
        for c in range(r0 // m.rows, (r0 + n - 1) // m.rows + 1):
            lo = max(r0, c * m.rows) - c * m.rows
            hi = min(r0 + n, (c + 1) * m.rows) - c * m.rows
            os.posix_fadvise(fd, int(m.starts[c]) + lo * m.row_bytes, (hi - lo) * m.row_bytes, os.POSIX_FADV_WILLNEED)

    def read(self, i: int, rows: int, r0: int, out: np.ndarray, scratch: dict[str, np.ndarray]) -> bool:
        """Rows [r0, r0 + len(out)) of shard i (which holds `rows`) into out [n, D] (float32 or the stored dtype)."""
        m = self.map(i, rows)
        if m is None or not out.flags.c_contiguous:
            return False
        if m.row_bytes != out.shape[-1] * m.dtype.itemsize or out.ndim != 2:  # not the width the index records
            raise CacheError(f"{self.shards[i]} changed while reading: run again")
        n = len(out)
        same = out.dtype == m.dtype
        if same:
            dst = out
        else:  # float16 on disk: into a reused buffer, converted by numpy
            key = f"direct {m.dtype.str}"
            dst = scratch.get(key)
            if dst is None or len(dst) < n or dst.shape[1:] != out.shape[1:]:
                dst = scratch[key] = np.empty((max(n, 64), *out.shape[1:]), m.dtype)
            dst = dst[:n]
        fd = self.fd(i)
        done = 0
        while done < n:  # one pread per chunk the rows touch (rows of one chunk are one byte range)
            row = r0 + done
            c, within = divmod(row, m.rows)
            take = min(n - done, m.rows - within)
            view = memoryview(dst[done : done + take]).cast("B")
            if os.preadv(fd, [view], int(m.starts[c]) + within * m.row_bytes) != take * m.row_bytes:
                raise CacheError(f"{self.shards[i]} is truncated or changed while reading: run again")
            done += take
        if not same:
            out[...] = dst
        return True

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
