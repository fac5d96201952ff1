"""Reruns by stat (rerun.py): unchanged files are not read; racy, copied, touched or legacy-cached ones are hashed;
--checksum hashes everything."""

from __future__ import annotations

import importlib
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import compact, read_index, shards_dir
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import CacheError
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.sources.folder import discover
from tests.conftest import draw

rerun = importlib.import_module("catdog_cache.extract.rerun")
CFG = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0, batch_size=4)
HOUR = 3600 * 10**9


def backdate(folder, ago_ns: int = HOUR) -> None:
    """Every file last written an hour ago: outside the racy window of the next scan."""
    t = time.time_ns() - ago_ns
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(t, t))


@pytest.fixture
def hashed(monkeypatch):
    """Files whose content the rerun check reads (extract's plan, predict's checks)."""
    seen: list[str] = []
    real = rerun.sha256_file

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(rerun, "sha256_file", counting)
    return seen


def test_discover_keeps_the_walks_stat_per_sample(kaggle_dir):
    disc = discover(kaggle_dir)
    assert disc.stat is not None and disc.stat.shape == (12, 5) and disc.stat.dtype == np.int64
    for s, row in zip(disc.samples, disc.stat.tolist(), strict=True):
        st = os.stat(kaggle_dir / s.rel)
        assert row == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]
    disc.keep({"dog.3.jpg", "cat.1.jpg"})
    assert [s.rel for s in disc.samples] == ["cat.1.jpg", "dog.3.jpg"]
    assert disc.stat[1, 0] == os.stat(kaggle_dir / "dog.3.jpg").st_size


def test_unchanged_files_are_not_opened(tmp_path, kaggle_dir, hashed):
    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    idx = read_index(cache)
    assert idx.scan_ns > 0 and (idx.stat[:, 0] == [os.path.getsize(kaggle_dir / p.decode()) for p in idx.paths]).all()
    # the counter says no file was read (a chmod 0 to prove it would move every ctime: a change by the stat rule)
    r = extract(kaggle_dir, cache, CFG)
    assert (r.extracted, r.reused, r.hashed, r.failed) == (0, 12, 0, [])
    assert hashed == []


def test_racy_files_are_hashed_and_a_same_tick_change_is_caught(tmp_path, kaggle_dir, hashed):
    """Files written just before the scan: their stat proves nothing (a second write in the same timestamp tick
    keeps size and mtime). Simulated: new bytes of the same size, mtime put back."""
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)  # the fixture just wrote them: all racy
    victim = kaggle_dir / "cat.2.jpg"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(victim, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_ino == st.st_ino
    r = extract(kaggle_dir, cache, CFG)
    assert r.hashed == 12 and r.reused == 11 and r.extracted + len(r.failed) == 1
    assert read_index(cache).sha256[read_index(cache).paths.index(b"cat.2.jpg")] == rerun.sha256_file(victim)


def test_touch_with_same_content_is_hashed_once_then_reused_by_stat(tmp_path, kaggle_dir, hashed):
    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    os.utime(kaggle_dir / "dog.1.jpg", ns=(time.time_ns() - HOUR // 2,) * 2)  # touched, same bytes, not racy
    r = extract(kaggle_dir, cache, CFG)
    assert (r.extracted, r.reused, r.hashed) == (0, 12, 1) and hashed == ["dog.1.jpg"]
    r = extract(kaggle_dir, cache, CFG)  # the refresh record made it a stat match
    assert (r.extracted, r.reused, r.hashed) == (0, 12, 0)


def test_same_size_change_with_mtime_restored_is_seen_by_ctime(tmp_path, kaggle_dir, hashed):
    """Once the documented limit (git and rsync without ctime miss it): now the ctime the rewrite moved says so."""
    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    victim = kaggle_dir / "dog.4.jpg"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(victim, "r+b") as fh:
        fh.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = extract(kaggle_dir, cache, CFG)
    assert (r.hashed, r.reused, r.extracted + len(r.failed)) == (1, 11, 1) and hashed == ["dog.4.jpg"]
    r = extract(kaggle_dir, cache, CFG, checksum=True)
    assert r.hashed == 12 and r.reused == 12
    idx = read_index(cache)
    assert idx.sha256[idx.paths.index(b"dog.4.jpg")] == rerun.sha256_file(victim)


def test_cache_without_stats_is_hashed_once_then_fast(tmp_path, kaggle_dir, hashed):
    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    compact(cache, {}, single=True)
    with h5py.File(cache, "a") as f:  # as a catdog-cache before stats wrote it
        del f["stat"], f["failures/stat"]
        del f.attrs["scan_ns"]
    assert read_index(cache).scan_ns == 0 and (read_index(cache).stat == -1).all()
    before = os.path.getsize(cache)
    r = extract(kaggle_dir, cache, CFG)
    assert (r.extracted, r.reused, r.hashed) == (0, 12, 12)
    # the old file became shard 0 (hard-linked), the run added a shard of refresh records only: no row rewritten
    shards = sorted(shards_dir(cache).iterdir())
    assert len(shards) == 2 and shards[1].name.endswith("-refresh.h5")
    assert read_index(shards[1]).shape[0] == 0 and len(read_index(shards[1]).refresh) == 12
    idx = read_index(cache)  # the view applies the later shard's records to the rows holding the same sha256
    assert idx.shape[0] == 12 and (idx.stat[:, 2] > 0).all() and (idx.stat_scan > 0).all()
    assert sum(p.stat().st_size for p in shards) - before <= 16384 + os.path.getsize(cache)
    r = extract(kaggle_dir, cache, CFG)
    assert (r.extracted, r.reused, r.hashed) == (0, 12, 0)
    for single in (False, True):  # compact and compact --single keep the refreshed stats
        compact(cache, {}, single=single)
        assert (read_index(cache).stat == idx.stat).all()
        assert extract(kaggle_dir, cache, CFG).hashed == 0


def test_refresh_applies_to_its_own_content_and_newest_wins(tmp_path, kaggle_dir, hashed):
    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    victim = kaggle_dir / "cat.5.jpg"
    for n in range(2):  # two touches: two refresh shards for the same file, the later one's stat wins
        t = time.time_ns() - HOUR + (n + 1) * 10**9
        os.utime(victim, ns=(t, t))
        assert extract(kaggle_dir, cache, CFG).hashed == 1
        row = read_index(cache).paths.index(b"cat.5.jpg")
        assert read_index(cache).stat[row, 1] == t
    victim.write_bytes(b"not an image any more")  # new content: the old row's records no longer vouch for it
    t = time.time_ns() - HOUR
    os.utime(victim, ns=(t, t))
    r = extract(kaggle_dir, cache, CFG)
    assert r.hashed == 1 and len(r.failed) == 1
    assert extract(kaggle_dir, cache, CFG).hashed == 0  # the failure record carries its stat


def test_a_copy_changes_the_inode_and_is_hashed(tmp_path, kaggle_dir, hashed):
    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    victim = kaggle_dir / "cat.5.jpg"
    shutil.copy2(victim, tmp_path / "copy.jpg")  # same bytes, size and mtime; a new inode once moved back
    os.replace(tmp_path / "copy.jpg", victim)
    r = extract(kaggle_dir, cache, CFG)
    assert (r.extracted, r.reused, r.hashed) == (0, 12, 1) and hashed == ["cat.5.jpg"]
    assert extract(kaggle_dir, cache, CFG).hashed == 0


def test_predict_checks_use_the_stat_rule(tmp_path, kaggle_dir, hashed):
    from catdog_cache.score.features import _check_covered, up_to_date

    backdate(kaggle_dir)
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    assert up_to_date(kaggle_dir, cache, CFG) and hashed == []
    _check_covered(cache, kaggle_dir, tmp_path / "h.pt", True, None)
    assert hashed == []
    os.utime(kaggle_dir / "cat.0.jpg")  # same content, new mtime: hashed, still up to date
    assert up_to_date(kaggle_dir, cache, CFG) and hashed == ["cat.0.jpg"]
    (kaggle_dir / "cat.0.jpg").write_bytes(b"changed")
    assert not up_to_date(kaggle_dir, cache, CFG)
    with pytest.raises(Exception, match="1 images .* changed"):
        _check_covered(cache, kaggle_dir, tmp_path / "h.pt", True, None)


@pytest.mark.parametrize("column", ["stat", "failures/stat"])
@pytest.mark.parametrize("bad", ["int32", "shape", "chunked"])
def test_crafted_stat_columns_are_refused(tmp_path, kaggle_dir, column, bad):
    cache = tmp_path / "c.h5"
    extract(kaggle_dir, cache, CFG)
    compact(cache, {}, single=True)  # one file: what each shard is
    with h5py.File(cache, "a") as f:
        n = f[column].shape[0]
        del f[column]
        if bad == "int32":
            f.create_dataset(column, data=np.zeros((n, 4), np.int32))
        elif bad == "shape":
            f.create_dataset(column, data=np.zeros((n + 1, 4), np.int64))
        else:
            f.create_dataset(column, data=np.zeros((max(n, 1), 4), np.int64)[:n], chunks=(1, 4), maxshape=(None, 4))
    with pytest.raises(CacheError, match="stat"):
        read_index(cache)


def test_cli_checksum_reads_every_known_file(cli, kaggle_dir):
    from tests.conftest import TINY

    backdate(kaggle_dir)
    cli("extract", kaggle_dir, *TINY)
    assert "read to check" not in cli("extract", kaggle_dir, *TINY).output
    r = cli("extract", kaggle_dir, *TINY, "--checksum")
    assert "reused 12 (12 read to check)" in r.output


def test_encode_paths_is_encode_path_for_every_name():
    from catdog_cache.cache import encode_path, encode_paths

    rels = ["cat/a.jpg", "é.jpg", os.fsdecode(b"\x80\xff.jpg"), "日本/猫.png", "x"]
    assert encode_paths(rels) == [encode_path(r) for r in rels] and encode_paths([]) == []


def test_rerun_compares_lists_only_when_the_cache_lists_the_folder_in_order(tmp_path, monkeypatch, hashed):
    """A cache grown over two runs lists its rows part by part, not in the folder's order; a name that is not UTF-8
    sorts apart as str and as bytes. Either way every unchanged file is reused by its stat, none read."""
    root = tmp_path / "d"
    for name in ["b.jpg", "é.jpg"]:
        draw(root / "cat" / name, "cat", len(name))
    draw(root / "dog" / "c.jpg", "dog", 3)
    backdate(root)
    cache = tmp_path / "c.h5"
    seen: list[bool] = []
    real = rerun.by_stat

    def spy(*args, **kwargs):
        seen.append(bool(kwargs.get("aligned", args[5] if len(args) > 5 else False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(rerun, "by_stat", spy)
    extract(root, cache, CFG)
    assert extract(root, cache, CFG).reused == 3 and seen[-1] is True  # one run's rows: the folder's order
    draw(root / "dog" / "a.jpg", "dog", 4)
    odd = os.fsencode(root / "cat") + b"/\x80.jpg"  # str sorts it after é.jpg, bytes before
    shutil.copy(root / "cat" / "b.jpg", os.fsdecode(odd))
    backdate(root)
    assert extract(root, cache, CFG).extracted == 2
    hashed.clear()
    r = extract(root, cache, CFG)
    assert (r.extracted, r.reused, r.hashed) == (0, 5, 0) and seen[-1] is False and hashed == []
