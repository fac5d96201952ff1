"""Hardening round 4, the rerun items: ctime in the stat rule (item 6) and done markers that vouch for the cache's
rows (item 3)."""

from __future__ import annotations

import json
import os
import shutil
import time
from unittest import mock

import h5py
import pytest

from catdog_cache.cache import compact, finish, read_index, shards_dir
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract import loader
from catdog_cache.extract.folder_units import cut_folder, run_unit, unit_done
from catdog_cache.extract.markers import markers_dir, tar_unit
from catdog_cache.extract.plan import known_files
from catdog_cache.extract.rerun import sha256_file
from catdog_cache.sources.folder import discover
from tests.conftest import draw
from tests.extract.test_rerun import CFG, HOUR, backdate
from tests.extract.test_tars import make_tar


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


def backup(cache, where):
    """A copy of the cache as a backup tool makes it: the index and its shards folder (not the markers)."""
    where.mkdir()
    shutil.copy2(cache, where / cache.name)
    shutil.copytree(shards_dir(cache), where / shards_dir(cache).name)


def restore(where, cache):
    shutil.rmtree(shards_dir(cache))
    shutil.copy2(where / cache.name, cache)
    shutil.copytree(where / shards_dir(cache).name, shards_dir(cache))


def tar_rows(cache):
    idx = read_index(cache)
    return sorted(zip(idx.paths, idx.sha256, strict=True))


def test_a_cache_restored_beside_newer_tar_markers_reads_the_tar_again(tmp_path, images, opened):
    """The old code reused the tar ("reused 4") and kept the restored rows of its old content: 0 of 4 matched."""
    names = sorted(images)[:4]
    shard = make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names])
    cache = tmp_path / "c.h5"
    extract(str(shard), cache, CFG)
    backup(cache, tmp_path / "backup")
    time.sleep(0.01)
    make_tar(shard, [(n, images[m]) for n, m in zip(names, sorted(images)[4:], strict=True)])  # other images
    extract(str(shard), cache, CFG)
    want = tar_rows(cache)
    restore(tmp_path / "backup", cache)
    assert tar_rows(cache) != want and (markers_dir(cache) / f"{tar_unit(str(shard))}.json").exists()
    opened.clear()
    r = extract(str(shard), cache, CFG)
    assert (r.reused, r.extracted, opened) == (0, 4, [str(shard)])
    assert tar_rows(cache) == want  # replaced, not duplicated
    opened.clear()
    assert extract(str(shard), cache, CFG).reused == 4 and opened == []  # and done again


def test_stale_keys_of_a_redone_tar_killed_before_its_index_are_dropped_by_the_next_run(tmp_path, images, opened):
    """A redone tar's marker is written before the index drops the keys it no longer has; a run killed in between
    left those rows (the old code: "reused", kept for good). Now its marker does not match them: read again."""
    names = sorted(images)
    shard = make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names[:4]])
    cache = tmp_path / "c.h5"
    extract(str(shard), cache, CFG)
    time.sleep(0.01)
    make_tar(shard, [(n, images[n]) for n in names[:3]])  # one sample fewer
    with mock.patch("catdog_cache.extract.tars.finish_run", side_effect=SystemExit), pytest.raises(SystemExit):
        extract(str(shard), cache, CFG)  # killed after the marker, before the index
    assert markers_dir(cache).joinpath(f"{tar_unit(str(shard))}.json").exists()
    opened.clear()
    r = extract(str(shard), cache, CFG)
    assert opened == [str(shard)] and r.extracted == 3
    assert [p.decode() for p, _ in tar_rows(cache)] == [n.removesuffix(".jpg") for n in names[:3]]


def test_a_marker_without_a_digest_is_verified_by_hashing_once(tmp_path, images, opened, monkeypatch):
    """Markers written before they had a digest: the tar is read and hashed (not decoded) and the marker upgraded;
    one whose cache was restored from an older backup does not verify and the tar is read again."""
    names = sorted(images)[:4]
    shard = make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names])
    cache = tmp_path / "c.h5"
    extract(str(shard), cache, CFG)
    marker = markers_dir(cache) / f"{tar_unit(str(shard))}.json"

    def strip() -> None:
        data = json.loads(marker.read_text())
        assert len(data.pop("digest")) == 64
        marker.write_text(json.dumps(data))

    strip()
    decoded: list[int] = []
    real = loader.ImageFiles.decode
    monkeypatch.setattr(loader.ImageFiles, "decode", lambda self, i, data: (decoded.append(1), real(self, i, data))[1])
    opened.clear()
    r = extract(str(shard), cache, CFG)
    assert (r.reused, r.extracted, opened, decoded) == (4, 0, [str(shard)], [])  # read and hashed, not decoded
    assert json.loads(marker.read_text())["digest"]  # upgraded: paid once
    opened.clear()
    assert extract(str(shard), cache, CFG).reused == 4 and opened == []
    backup(cache, tmp_path / "backup")
    time.sleep(0.01)
    make_tar(shard, [(n, images[m]) for n, m in zip(names, sorted(images)[4:], strict=True)])
    extract(str(shard), cache, CFG)
    want = tar_rows(cache)
    restore(tmp_path / "backup", cache)
    strip()
    r = extract(str(shard), cache, CFG)
    assert (r.reused, r.extracted) == (0, 4) and tar_rows(cache) == want


def test_a_compacted_cache_keeps_its_tar_markers_valid(tmp_path, images, opened):
    """The digest is over the rows, not the shards holding them: a compact (new shard names) changes nothing."""
    names = sorted(images)
    shards = [make_tar(tmp_path / f"s-{k}.tar", [(n, images[n]) for n in names[4 * k:4 * k + 4]]) for k in range(2)]
    cache = tmp_path / "c.h5"
    for s in shards:
        extract(str(s), cache, CFG)
    compact(cache, {})
    opened.clear()
    assert extract(str(tmp_path / "s-{0..1}.tar"), cache, CFG).reused == 8 and opened == []


def test_a_ray_folder_unit_beside_a_restored_cache_is_not_done(tmp_path):
    """Ray folder units (folder_units.unit_done): the cache restored from a backup holds the changed file's old
    row, under a marker whose identity is the file's new size and mtime. The old code (identity and "recorded
    somewhere") said done and kept the stale row; now each row's recorded stat must be the file's."""
    data = tmp_path / "data"
    for i in range(2):
        draw(data / "cat" / f"{i}.jpg", "cat", i)
        draw(data / "dog" / f"{i}.jpg", "dog", 10 + i)
    backdate(data)
    cache, prov = tmp_path / "c.h5", CFG.provenance()

    def run_all() -> list:
        disc = discover(data)
        source = str(disc.root.resolve())
        units = cut_folder(disc.root, disc.samples, source, prov, 2, disc.classes, disc.stat)
        known = known_files(cache, prov, source)
        for unit in units:
            if not unit_done(cache, unit, known):
                run_unit(unit, disc.root, cache, CFG, prov, source, "run", known.files, known.reasons,
                         scan_ns=time.time_ns())
        finish(cache, prov, {})
        return units

    run_all()
    backup(cache, tmp_path / "backup")
    draw(data / "cat" / "0.jpg", "dog", 55)  # other content, new size and mtime
    t = time.time_ns() - HOUR // 2
    os.utime(data / "cat" / "0.jpg", ns=(t, t))  # not racy (backdating all would move every file's ctime)
    units = run_all()
    want = tar_rows(cache)
    restore(tmp_path / "backup", cache)
    disc = discover(data)
    source = str(disc.root.resolve())
    known = known_files(cache, prov, source)
    again = cut_folder(disc.root, disc.samples, source, prov, 2, disc.classes, disc.stat)
    assert [u.identity for u in again] == [u.identity for u in units]  # the markers match the folder as it is
    assert [unit_done(cache, u, known) for u in again] == [False, True]
    run_all()
    assert tar_rows(cache) == want
