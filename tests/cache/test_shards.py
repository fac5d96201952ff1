"""Sharded caches (schema 2): appends write O(new rows), old caches convert in O(1), orphans are adopted, compact
changes nothing a reader sees, plain h5py reads the index's virtual datasets, and crafted indexes are refused."""

import os
import shutil
import time

import h5py
import numpy as np
import pytest

from catdog_cache.backbone import IMAGENET
from catdog_cache.cache import (
    INDEX_SCHEMA,
    Provenance,
    Rows,
    assemble,
    compact,
    finish,
    list_parts,
    listed,
    open_cache,
    read_features,
    read_index,
    shards_dir,
    write_part,
)
from catdog_cache.cache.shard_state import read_state, shards_folder, state_view
from catdog_cache.cache.shards import _convert, write_index, writer_state
from catdog_cache.errors import CacheError

PROV = Provenance("tiny", "fc7", "random:seed=0", IMAGENET.spec(), "center", "float32", "fp32")
D = 64


def rows_for(names, value, fail=()):
    r = Rows()
    for i, n in enumerate(names):
        r.features.append(np.full((1, D), value + i, np.float32))
        r.paths.append(n.encode())
        r.labels.append(i % 2)
        r.sha256.append(f"{value + i:064x}")
    for n in fail:
        r.failed_paths.append(n.encode())
        r.failed_sha256.append("f" * 64)
        r.failed_reasons.append("bad")
    return r


def part(cache, name, names, value, source="/src", fail=()):
    write_part(cache, name, PROV, source, rows_for(names, value, fail), {}, (1, D))


def same(a, b):
    """Same Index and features, in the same order."""
    ia, ib = read_index(a), read_index(b)
    assert ia.paths == ib.paths and ia.sources == ib.sources and ia.source.tolist() == ib.source.tolist()
    assert ia.labels.tolist() == ib.labels.tolist() and ia.sha256 == ib.sha256 and ia.failed == ib.failed
    assert ia.shape == ib.shape and ia.incomplete == ib.incomplete
    np.testing.assert_array_equal(read_features(a), read_features(b))


def history(cache):
    """Three runs: a first folder, a second folder, then a changed file, a new file and a file that now fails."""
    part(cache, "part-001", [f"{i:03d}.jpg" for i in range(100)], 0)
    part(cache, "part-002", [f"{i:03d}.jpg" for i in range(100, 150)], 100, fail=["zz.jpg"])
    finish(cache, PROV, {})
    part(cache, "part-003", ["a.jpg", "b.jpg"], 500, source="/other")
    finish(cache, PROV, {})
    part(cache, "part-004", ["010.jpg", "0105.jpg", "zz.jpg"], 900, fail=["020.jpg"])
    return finish(cache, PROV, {}, drop={("/src", b"030.jpg")})


def test_sharded_equals_single_file_and_compacted(tmp_path):
    sharded = tmp_path / "s" / "c.h5"
    index = history(sharded)
    assert listed(sharded)[0] == INDEX_SCHEMA and len(list(shards_dir(sharded).iterdir())) == 4
    keys = [p.decode() for p in index.paths]
    assert keys[:3] == ["000.jpg", "001.jpg", "002.jpg"] and "0105.jpg" in keys and "020.jpg" not in keys
    assert "030.jpg" not in keys and keys[-2:] == ["a.jpg", "b.jpg"] and len(keys) == len(set(keys))
    assert [(index.sources[s], p) for s, p, *_ in index.failed] == [("/src", b"020.jpg")]  # zz.jpg was fixed
    x = read_features(sharded)
    assert x[keys.index("010.jpg"), 0] == 900 and x[keys.index("011.jpg"), 0] == 11  # the changed file's new row
    # the same parts assembled into one schema-1 file: the same Index, the same features
    single = tmp_path / "one" / "c.h5"
    for name in ("part-001", "part-002"):
        shutil.copy(shards_dir(sharded) / f"{name}.h5", shards_folder(single, create=True) / f"{name}.h5")
    assemble(single, PROV, {})
    shutil.copy(shards_dir(sharded) / "part-003.h5", shards_folder(single, create=True))
    assemble(single, PROV, {})
    shutil.copy(shards_dir(sharded) / "part-004.h5", shards_folder(single, create=True))
    assemble(single, PROV, {}, drop={("/src", b"030.jpg")})
    assert listed(single)[0] == 1
    same(sharded, single)
    before = read_index(sharded)
    assert compact(sharded, {}) == (4, 1)
    assert len(list(shards_dir(sharded).iterdir())) == 1
    same(sharded, single)
    assert read_index(sharded).paths == before.paths


def test_append_writes_only_the_new_rows_and_the_index(tmp_path):
    cache = tmp_path / "c.h5"
    for k in range(4):
        part(cache, f"part-{k:03d}", [f"{k}-{i:04d}.jpg" for i in range(500)], k * 1000)
    finish(cache, PROV, {})
    old = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards_dir(cache).iterdir()}
    part(cache, "part-100", [f"9-{i}.jpg" for i in range(10)], 7)  # 10 new rows
    new_shard = shards_dir(cache) / "part-100.h5"
    index = finish(cache, PROV, {})
    assert index.shape[0] == 2010
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards_dir(cache).iterdir()
            if p.name != "part-100.h5"} == old  # no old shard rewritten
    written = cache.stat().st_size + new_shard.stat().st_size
    assert written < 64 * 1024 + 10 * D * 4 * 4, written  # the index and 10 rows; the cache holds 2010 rows
    assert len(read_state(h5py.File(cache), cache).names) == 5


def test_single_file_cache_converts_on_first_append_and_every_step_reads(tmp_path):
    cache = tmp_path / "c.h5"
    part(cache, "part-001", ["a.jpg", "b.jpg", "c.jpg"], 1)
    assemble(cache, PROV, {})
    assert listed(cache)[0] == 1
    reference = read_index(cache)
    inode = cache.stat().st_ino
    # a kill right after the hard link: the old file is still the cache, the link an identical shard
    _convert(cache, shards_folder(cache, create=True))
    assert listed(cache)[0] == 1 and read_index(cache).paths == reference.paths
    part(cache, "part-999", ["b.jpg"], 50)
    index = finish(cache, PROV, {})
    assert listed(cache)[0] == INDEX_SCHEMA
    state = read_state(h5py.File(cache), cache)
    assert state.names[0].endswith("-legacy.h5") and len(state.names) == 2  # the killed link reused, not doubled
    assert (shards_dir(cache) / state.names[0]).stat().st_ino == inode  # converted in O(1): the same file
    assert index.paths == reference.paths
    assert read_features(cache)[:, 0].tolist() == [1, 50, 3]


def test_orphan_shards_are_adopted_in_creation_order(tmp_path):
    cache = tmp_path / "c.h5"
    part(cache, "part-001", ["a.jpg", "b.jpg"], 1)
    finish(cache, PROV, {})
    part(cache, "part-003", ["b.jpg"], 30)  # a killed run's saved work, newest
    part(cache, "part-002", ["b.jpg"], 20)
    assert read_index(cache).shape[0] == 2 and read_features(cache)[1, 0] == 2  # readers see only listed shards
    assert [p.name for p in list_parts(cache)] == ["part-002.h5", "part-003.h5"]
    (shards_dir(cache) / ".part-004.h5.x.tmp").write_bytes(b"half a shard")
    finish(cache, PROV, {})
    assert read_features(cache)[:, 0].tolist() == [1, 30]
    assert list_parts(cache) == [] and not (shards_dir(cache) / ".part-004.h5.x.tmp").exists()


def test_interrupted_compact_never_resurrects_old_rows(tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    history(cache)
    reference = read_index(cache)
    ref_x = read_features(cache)
    import catdog_cache.cache.shards as shards

    def killed(cache, state):
        raise KeyboardInterrupt  # after the new index, before any old shard is deleted

    monkeypatch.setattr(shards, "_delete_retired", killed)
    with pytest.raises(KeyboardInterrupt):
        compact(cache, {})
    monkeypatch.undo()
    assert len(list(shards_dir(cache).iterdir())) == 5 and list_parts(cache) == []  # retired: never adopted
    index = finish(cache, PROV, {})  # the next writer deletes them
    assert len(list(shards_dir(cache).iterdir())) == 1
    assert index.paths == reference.paths and index.failed == reference.failed
    np.testing.assert_array_equal(read_features(cache), ref_x)


def test_plain_h5py_reads_the_index_after_the_folder_moves(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "c.h5"
    history(cache)
    x, labels = read_features(cache, view=None), read_index(cache).labels
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    with h5py.File(tmp_path / "b" / "c.h5", "r") as f:
        assert f["features"].is_virtual
        np.testing.assert_array_equal(f["features"][...], x)
        np.testing.assert_array_equal(f["labels"][...], labels)


def test_streamed_reads_match_in_memory_across_shards(tmp_path):
    cache = tmp_path / "c.h5"
    history(cache)
    x = read_features(cache)
    with open_cache(cache) as (view, index):
        assert len(view.runs()) > 4  # the changed and dropped rows split the shards into runs
        for lo, hi in ((0, 64), (60, 130), (100, 151), (0, index.shape[0])):
            np.testing.assert_array_equal(view.read(lo, hi), x[lo:hi])


def crafted(cache, **changes):
    """Rewrite one field of a valid index as a crafted file would."""
    state = writer_state(cache, PROV)
    view = state_view(cache, state, check_prov=False)
    for k, v in changes.items():
        setattr(state, k, v)
    write_index(cache, state, view, {})
    view.close()


@pytest.mark.parametrize("name", ["../c.h5", "a/b.h5", ".hidden.h5", "..", "x.h5\n", "/etc/passwd"])
def test_index_with_a_bad_shard_name_is_refused(tmp_path, name):
    cache = tmp_path / "c.h5"
    history(cache)
    state = read_state(h5py.File(cache), cache)
    crafted(cache, names=[name] + state.names[1:])
    with pytest.raises(CacheError, match="plain file names"):
        read_index(cache)


def test_replaced_truncated_or_linked_shards_are_refused(tmp_path):
    cache = tmp_path / "c.h5"
    history(cache)
    names = read_state(h5py.File(cache), cache).names
    shard = shards_dir(cache) / names[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CacheError, match=f"{names[1]}.*replaced or truncated"):
        read_index(cache)
    shard.unlink()
    (tmp_path / "elsewhere.h5").write_bytes(data)
    shard.symlink_to(tmp_path / "elsewhere.h5")
    with pytest.raises(CacheError, match="not a regular file"):
        read_index(cache)
    shard.unlink()
    shard.write_bytes(data)
    assert read_index(cache).shape[0] > 0
    folder = shards_dir(cache)
    folder.rename(tmp_path / "real")
    folder.symlink_to(tmp_path / "real")
    with pytest.raises(CacheError, match="symbolic link"):
        read_index(cache)


def test_shard_of_other_provenance_or_width_is_refused(tmp_path):
    cache = tmp_path / "c.h5"
    part(cache, "part-001", ["a.jpg"], 1)
    finish(cache, PROV, {})
    other = Provenance("tiny", "fc7", "random:seed=1", IMAGENET.spec(), "center", "float32", "fp32")
    write_part(cache, "part-002", other, "/src", rows_for(["b.jpg"], 2), {}, (1, D))
    state = writer_state(cache, PROV)
    state.rows[-1], state.sizes[-1] = 1, (shards_dir(cache) / "part-002.h5").stat().st_size
    with pytest.raises(CacheError, match="provenance differs"):  # listed in a crafted index
        with h5py.File(cache, "a") as f:
            del f["shards"]
            g = f.create_group("shards")
            g.create_dataset("names", data=np.array([n.encode() for n in state.names], dtype=object),
                             dtype=h5py.vlen_dtype(bytes))
            g.create_dataset("rows", data=np.array(state.rows, np.uint64))
            g.create_dataset("bytes", data=np.array(state.sizes, np.uint64))
        read_index(cache)


def test_schema1_file_with_virtual_features_is_still_refused(tmp_path):
    cache = tmp_path / "c.h5"
    part(cache, "part-001", ["a.jpg"], 1)
    assemble(cache, PROV, {})
    with h5py.File(cache, "a") as f:
        layout = h5py.VirtualLayout(shape=(1, 1, D), dtype="float32")
        layout[0] = h5py.VirtualSource(str(tmp_path / "x.h5"), "features", (1, 1, D))[0]
        del f["features"]
        f.create_virtual_dataset("features", layout)
    with pytest.raises(CacheError, match="virtual"):
        read_index(cache)



def test_cli_extract_appends_info_counts_shards_compact_merges(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from catdog_cache.cli import app
    from tests.conftest import TINY, draw

    monkeypatch.chdir(tmp_path)
    for i in range(2):
        draw(tmp_path / f"train/cat.{i}.jpg", "cat", i)
        draw(tmp_path / f"train/dog.{i}.jpg", "dog", 100 + i)
    # written an hour ago: outside the racy window, so the second run trusts their stats and adds no refresh shard
    # (a run starting more than 2 s after the files were drawn, on a busy machine, would otherwise add a third)
    old = time.time_ns() - 3600 * 10**9
    for f in (tmp_path / "train").iterdir():
        os.utime(f, ns=(old, old))
    run = CliRunner()
    assert run.invoke(app, ["extract", "train", *map(str, TINY), "--quiet"]).exit_code == 0
    draw(tmp_path / "train/cat.9.jpg", "cat", 9)
    assert run.invoke(app, ["extract", "train", *map(str, TINY), "--quiet"]).exit_code == 0
    info = json.loads(run.invoke(app, ["info", "--json"]).output)
    assert (info["layout"], info["shards"], info["rows"]) == ("sharded", 2, 5)
    x = read_features("cache/features.h5")
    r = run.invoke(app, ["compact"])
    assert r.exit_code == 0 and "2 shards -> 1 shard" in r.output
    assert json.loads(run.invoke(app, ["info", "--json"]).output)["shards"] == 1
    r = run.invoke(app, ["compact", "--single"])
    assert r.exit_code == 0 and listed(tmp_path / "cache/features.h5")[0] == 1 and not shards_dir(
        tmp_path / "cache/features.h5").exists()
    np.testing.assert_array_equal(read_features("cache/features.h5"), x)


def test_lean_open_has_the_full_opens_rows(tmp_path):
    """open_cache(lean=True), what fit reads: the same rows, labels, folders, paths and features as a full open, on
    a history with a changed file, a fixed failure, a deletion record and two folders (the merge's sorting path),
    and on an in-order cache (its no-sort path); the unread sha256 column raises instead of answering."""
    from catdog_cache.cache.packed_index import PackedPaths

    sharded = tmp_path / "s" / "c.h5"
    history(sharded)
    plain = tmp_path / "p" / "c.h5"
    part(plain, "part-001", [f"{i:03d}.jpg" for i in range(40)], 0)
    part(plain, "part-002", [f"{i:03d}.jpg" for i in range(40, 70)], 40)
    finish(plain, PROV, {})
    for cache in (sharded, plain):
        with open_cache(cache) as (full, a), open_cache(cache, lean=True) as (lean, b):
            assert isinstance(b.paths, PackedPaths) and list(b.paths) == a.paths
            assert b.source.tolist() == a.source.tolist() and b.labels.tolist() == a.labels.tolist()
            assert b.failed == a.failed and b.shape == a.shape and b.sources == a.sources
            assert full.seg_start.tolist() == lean.seg_start.tolist()
            assert full.seg_shard.tolist() == lean.seg_shard.tolist() and full.seg_row.tolist() == lean.seg_row.tolist()
            np.testing.assert_array_equal(full.read(0, a.shape[0]), lean.read(0, a.shape[0]))
            assert len(b.sha256) == len(a.sha256) and b.stat.shape == a.stat.shape
            with pytest.raises(RuntimeError, match="opened lean"):
                b.sha256[0]


def test_packed_paths_read_as_a_list_of_bytes():
    import bisect

    from catdog_cache.cache.packed_index import PackedPaths

    names = [b"a.jpg", b"", b"cat/\xff.jpg", b"dog/z.jpg"]
    p = PackedPaths.concat([PackedPaths.of(names[:2]), PackedPaths.of([]), PackedPaths.of(names[2:])])
    assert len(p) == 4 and list(p) == names and p[-1] == names[-1] and p[1:3] == names[1:3]
    assert bisect.bisect_left(p, b"cat/\xff.jpg", 2, 4) == 2 and list(p.take(np.array([3, 0]))) == [names[3], names[0]]
    with pytest.raises(IndexError):
        p[4]
    assert list(PackedPaths.concat([])) == []
