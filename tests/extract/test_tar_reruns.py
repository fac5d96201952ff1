"""Reruns over tar shards that must not keep stale rows: --checksum reads every shard again, and a done marker
written within the racy window of its shard's mtime proves nothing (hardening round 4, items 2 and 5)."""

from __future__ import annotations

import os

import numpy as np

from catdog_cache.cache import open_cache
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract.markers import markers_dir
from tests.extract.test_tars import CFG, make_tar


def swap_in_place(path, members):
    """The shard rewritten with other content of the same size, its size and mtime put back as they were (a
    reproducible archive, or a rewrite within one tick of a whole-second file system)."""
    st = os.stat(path)
    make_tar(path, members)
    assert os.stat(path).st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def features(cache):
    with open_cache(cache) as (f, index):
        return f.read(0, index.shape[0], view=None)


def test_checksum_reads_every_tar_shard_again(tmp_path, images, opened):
    names = sorted(images)[:4]
    shard = make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names])
    cache = tmp_path / "c.h5"
    extract(str(shard), cache, CFG)
    before = features(cache)  # [4, 1, D], in key order
    swapped = [names[1], names[0], *names[2:]]  # the first two keys swap their images: the same size in all
    swap_in_place(shard, [(n, images[m]) for n, m in zip(names, swapped, strict=True)])
    opened.clear()
    assert extract(str(shard), cache, CFG).reused == 4 and opened == []  # by stat alone: unchanged (documented)
    r = extract(str(shard), cache, CFG, checksum=True)
    assert (r.extracted, r.reused, len(opened)) == (4, 0, 1)
    after = features(cache)
    assert np.array_equal(after[0], before[1]) and np.array_equal(after[1], before[0])


def test_a_marker_written_in_the_shards_racy_window_is_not_trusted(tmp_path, images, opened):
    names = sorted(images)
    shard = make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names[:4]])
    now = (os.stat(shard).st_mtime_ns // 10**9 + 60) * 10**9  # a whole second, after anything written here
    os.utime(shard, ns=(now, now))  # ... this one changed "just now", on a file system of whole seconds
    cache = tmp_path / "c.h5"
    extract(str(shard), cache, CFG)
    opened.clear()
    r = extract(str(shard), cache, CFG)  # the marker is as new as the shard: read again, rows replaced
    assert (r.extracted, r.reused, len(opened)) == (4, 0, 1)
    marker = next(markers_dir(cache).glob("tar-*.json"))
    later = now + 5 * 10**9
    os.utime(marker, ns=(later, later))  # written well after the shard's change: trusted
    opened.clear()
    assert extract(str(shard), cache, CFG).reused == 4 and opened == []
    assert np.isfinite(features(cache)).all()
    fine = now + 123  # a nanosecond mtime: any rewrite changes it, so a fresh marker is trusted
    os.utime(shard, ns=(fine, fine))
    extract(str(shard), cache, CFG)
    opened.clear()
    assert extract(str(shard), cache, CFG).reused == 4 and opened == []
