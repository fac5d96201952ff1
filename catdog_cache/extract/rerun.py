"""Which known files are unchanged: by their stat where it proves it, else by their content hash.

The rule, as git applies it by default: a file whose (size, mtime_ns, inode, device, ctime_ns) equal what the cache
recorded is reused without being read, unless its mtime is not older than the scan that recorded it (git's "racy"
rule, cache.format.RACY_NS); every other known file is hashed. `checksum` (extract --checksum, as rsync -c) hashes
them all. One rule for extract's plan, predict's "anything to do?" check and scoring from a training cache.

ctime is why content rewritten in place with the same size and the mtime put back (os.utime, `touch -r`, a
reproducible archive's `tar xf` whose unlink and create get the same inode back) is seen: no user call sets ctime,
and every write, utime, rename or chmod moves it to now. What is left (git's limit too): such a rewrite done twice
within one tick of the kernel's ctime clock, the scan between the two; --checksum closes it. ctime is compared, not
dated: the racy rule reads mtime alone, as git's. Rows recorded before ctime was (their ctime is unknown) are
hashed once, then refreshed, as rows older than stats are: any other rule would keep exactly the rewrite above.

A file found unchanged by hashing gets a refresh record (cache.format.Refresh): its new stat, tied to the sha256 it
was verified against, so the next run reuses it by stat. The alternative, writing it again as a row, would cost its
features again; the refresh costs 40-odd bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.format import RACY_NS, UNKNOWN_STAT, Recorded, encode_paths
from ..files import sha256_regular
from ..sources.decode import MAX_FILE_BYTES
from ..sources.folder import Discovery, Stat


def sha256_file(path: Path) -> str:
    return sha256_regular(path, MAX_FILE_BYTES)


def same_content(path: Path, sha: str) -> bool:
    """Whether the file still hashes to `sha`; unreadable or too large now is 'changed' (extract records why)."""
    try:
        return sha256_file(path) == sha
    except (OSError, ValueError):
        return False


def by_stat(disc: Discovery, recorded: Recorded, items: Sequence[int], checksum: bool = False,
            keys: list[bytes] | None = None, aligned: bool = False) -> tuple[list[int], list[int]]:
    """Known samples (indices into disc.samples) -> (unchanged by stat, to hash). Reads no file: the stats are the
    ones the walk took. `keys`: the samples' encoded paths, when the caller has them; `aligned`: they equal
    recorded.paths (the caller compared them), so sample i is recorded in row i: no lookup per file."""
    if checksum or not items or disc.stat is None:
        return [], list(items)
    at = np.arange(items.start, items.stop, items.step) if isinstance(items, range) else \
        np.asarray(items, dtype=np.int64)  # [K]
    if aligned:
        rows = at
    else:
        keys = keys if keys is not None else encode_paths(disc.rels)
        entries = recorded.entries
        rows = np.fromiter((entries[keys[i]][1] for i in items), np.int64, len(items))  # [K]
    same = (disc.stat[at] == recorded.stat[rows]).all(axis=1)  # [K]; UNKNOWN_STAT rows never match a real stat
    return at[same].tolist(), at[~same].tolist()


@dataclass
class Verdicts:
    unchanged: set[int] = field(default_factory=set)  # indices into disc.samples
    refresh: dict[int, Stat] = field(default_factory=dict)  # unchanged by hashing, with the stat to record
    hashed: int = 0  # files read to decide


def verdicts(disc: Discovery, recorded: Recorded, items: Sequence[int], scan_ns: int, checksum: bool = False,
             progress: Callable[[str, int, int], None] | None = None, keys: list[bytes] | None = None,
             aligned: bool = False) -> Verdicts:
    """Decide which known samples are unchanged: by stat, else by hashing (progress("hash", done, total)). A file
    found unchanged by hashing whose stat is not racy for this scan (started at `scan_ns`, before the walk) is
    returned in `refresh`. `keys`, `aligned`: as by_stat's."""
    out = Verdicts()
    keys = keys if keys is not None else encode_paths(disc.rels)
    fast, slow = by_stat(disc, recorded, items, checksum, keys, aligned)
    out.unchanged.update(fast)
    out.hashed = len(slow)
    for n, i in enumerate(slow):
        if progress and (n % 256 == 0 or n == len(slow) - 1):
            progress("hash", n + 1, len(slow))
        sha = recorded.sha256(keys[i])
        had = tuple(recorded.stats([keys[i]])[0].tolist())
        if same_content(disc.root / disc.rels[i], sha):
            out.unchanged.add(i)
            now = tuple(disc.stat[i].tolist()) if disc.stat is not None else UNKNOWN_STAT
            if now != had and now[0] >= 0 and now[1] < scan_ns - RACY_NS:
                out.refresh[i] = now
    return out
