"""Hardening round 4, the rerun items: ctime in the stat rule (item 6) and done markers that vouch for the cache's
rows (item 3)."""

from __future__ import annotations

import os
import time

import h5py

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import compact, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.rerun import sha256_file
from tests.conftest import draw

CFG = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0, batch_size=4)
HOUR = 3600 * 10**9


def backdate(folder, ago_ns: int = HOUR) -> None:
    """Every file last written an hour ago: outside the racy window of the next scan."""
    t = time.time_ns() - ago_ns
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(t, t))


def rewrite_in_place(victim) -> None:
    """Other bytes of the same size into `victim` (one flipped in the middle of its JPEG data: it still decodes), on
    the same inode, its mtime put back: only ctime moves."""
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(victim, "r+b") as fh:
        fh.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = victim.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino, now.st_dev) == (st.st_size, st.st_mtime_ns, st.st_ino,
                                                                      st.st_dev)
    assert now.st_ctime_ns != st.st_ctime_ns


def row_sha(cache, rel: str) -> str:
    idx = read_index(cache)
    return idx.sha256[idx.paths.index(rel.encode())]


def test_same_inode_size_and_mtime_but_new_ctime_is_extracted_again(tmp_path):
    """A reproducible archive unpacked over an older one (`tar xf` with --mtime): same inode, size and mtime. The
    old code reused every row by stat and kept the stale ones; ctime (which no user call sets) says it changed."""
    root = tmp_path / "data"
    for i in range(3):
        draw(root / "cat" / f"{i}.jpg", "cat", i)
        draw(root / "dog" / f"{i}.jpg", "dog", 10 + i)
    backdate(root)
    cache = tmp_path / "c.h5"
    extract(root, cache, CFG)
    victim = root / "cat" / "1.jpg"
    rewrite_in_place(victim)
    r = extract(root, cache, CFG)
    assert (r.hashed, r.reused, r.extracted, r.failed) == (1, 5, 1, [])
    assert row_sha(cache, "cat/1.jpg") == sha256_file(victim)
    r = extract(root, cache, CFG)  # the new row recorded the new ctime: a stat match again
    assert (r.hashed, r.reused, r.extracted) == (0, 6, 0)


def test_utime_alone_moves_ctime_so_touch_r_is_hashed(tmp_path):
    """`touch -r` puts back mtime after a rewrite; utime itself moves ctime, so even content kept the same is
    hashed once (and found unchanged: refreshed, not extracted)."""
    root = tmp_path / "data"
    for i in range(2):
        draw(root / "cat" / f"{i}.jpg", "cat", i)
        draw(root / "dog" / f"{i}.jpg", "dog", 10 + i)
    backdate(root)
    cache = tmp_path / "c.h5"
    extract(root, cache, CFG)
    st = (root / "dog" / "0.jpg").stat()
    os.utime(root / "dog" / "0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    r = extract(root, cache, CFG)
    assert (r.hashed, r.reused, r.extracted) == (1, 4, 0)
    r = extract(root, cache, CFG)
    assert (r.hashed, r.reused, r.extracted) == (0, 4, 0)


def test_cache_without_ctime_is_hashed_once_and_catches_the_rewrite(tmp_path):
    """A cache written before ctime was recorded (its `stat` columns, no `ctime`): still opened; every row's ctime
    is unknown, so each file is hashed once (a stale row among them is extracted again), then refreshed."""
    root = tmp_path / "data"
    for i in range(3):
        draw(root / "cat" / f"{i}.jpg", "cat", i)
        draw(root / "dog" / f"{i}.jpg", "dog", 10 + i)
    backdate(root)
    cache = tmp_path / "c.h5"
    extract(root, cache, CFG)
    compact(cache, {}, single=True)
    with h5py.File(cache, "a") as f:  # as the catdog-cache before ctime wrote it
        assert f["stat"].shape == (6, 4) and f["ctime"].shape == (6,)
        del f["ctime"], f["failures/ctime"]
    idx = read_index(cache)
    assert (idx.stat[:, 4] == -1).all() and (idx.stat[:, 0] > 0).all()
    rewrite_in_place(root / "dog" / "2.jpg")
    r = extract(root, cache, CFG)
    assert (r.hashed, r.reused, r.extracted, r.failed) == (6, 5, 1, [])
    assert row_sha(cache, "dog/2.jpg") == sha256_file(root / "dog" / "2.jpg")
    r = extract(root, cache, CFG)
    assert (r.hashed, r.reused, r.extracted) == (0, 6, 0)
