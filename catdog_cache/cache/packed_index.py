"""Compact per-row columns for a lean open (open_cache(lean=True): what fit reads). At 10M rows a list of bytes
objects costs ~54 bytes a row for a 13-byte path and a list of sha256 str ~121: gigabytes of Python objects that fit
never looks at (it needs the labels, the folders and one hash of each path, once)."""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from .format import STAT_WIDTH

BLOCK = 1 << 16  # offsets turned into Python ints this many at a time while iterating


class PackedPaths(Sequence):
    """Relative paths as one bytes buffer + [n+1] int64 offsets: len + 8 bytes a row. Reads as a sequence of bytes
    (indexing, iteration, bisect); each access makes that one bytes object."""

    __slots__ = ("buf", "off")

    def __init__(self, buf: bytes, off: np.ndarray) -> None:
        self.buf = buf
        self.off = off  # [n+1] int64 (uint32 for one shard's), off[0] == 0, off[-1] == len(buf)

    @classmethod
    def of(cls, paths: Sequence[bytes]) -> PackedPaths:
        off = np.zeros(len(paths) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, paths), np.int64, len(paths)), out=off[1:])
        # one shard's paths: 4-byte offsets (each shard's index is held until the merge has concatenated them all)
        return cls(b"".join(paths), off.astype(np.uint32) if off[-1] < 2**32 else off)

    @classmethod
    def concat(cls, parts: Sequence[PackedPaths]) -> PackedPaths:
        if not parts:
            return cls.of([])
        base = np.cumsum([0] + [len(p.buf) for p in parts[:-1]])  # [P] where each part's bytes start
        off = np.concatenate([p.off[:-1].astype(np.int64) + b for p, b in zip(parts, base.tolist(), strict=True)]
                             + [np.array([int(base[-1]) + len(parts[-1].buf)], np.int64)])  # [n+1]
        return cls(b"".join(p.buf for p in parts), off)

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("path index out of range")
        return self.buf[int(self.off[i]) : int(self.off[i + 1])]

    def __iter__(self) -> Iterator[bytes]:
        buf = self.buf
        for s in range(0, len(self), BLOCK):
            o = self.off[s : s + BLOCK + 1].tolist()
            yield from (buf[a:b] for a, b in zip(o, o[1:], strict=False))

    def take(self, rows: np.ndarray) -> PackedPaths:
        """The paths of these rows, in this order."""
        return PackedPaths.of([self[i] for i in rows.tolist()])

    def nbytes(self) -> int:
        return len(self.buf) + self.off.nbytes


class Unread(Sequence):
    """A column a lean open did not read (fit needs no sha256): its length is known, any access is a bug, said
    plainly instead of a wrong value."""

    __slots__ = ("name", "n")

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        raise RuntimeError(f"the {self.name} column was not read: this cache was opened lean "
                           "(open_cache(lean=True)); open it in full to use it")


def unknown_stat_view(n: int) -> np.ndarray:
    """[n, STAT_WIDTH] of -1 (UNKNOWN_STAT) without memory: a read-only broadcast (a lean open reads no stat)."""
    return np.broadcast_to(np.int64(-1), (n, STAT_WIDTH))


def scan_view(n: int, scan_ns: int = 0) -> np.ndarray:
    """[n] of one scan time without memory (read-only)."""
    return np.broadcast_to(np.int64(scan_ns), (n,))


def release_freed() -> None:
    """Hand the heap the merge freed back to the OS (glibc's malloc_trim; elsewhere nothing): a lean open of 10M rows
    frees about as much as it keeps (each shard's columns, concatenated), in small blocks malloc would otherwise hold
    for the rest of the fit. 1M rows: 52 -> 30 MiB of RSS, 7 ms."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
