"""Paths from the index with plain h5py (issue 31, item 12): `paths` and `sha256` are virtual datasets over the shards
as `features` and `labels` are, `source_rows` counts each source's rows (a shard's own `source` column indexes its own
sources, so it is not mapped). Before, the index had only features and labels: paths meant reading every shard."""

import json
import shutil

import h5py
import numpy as np

from catdog_cache.cache import compact, finish, open_cache, read_features, write_part
from tests.cache.test_shards import PROV, D, history, rows_for


def plain(index_file):
    """What a user without catdog-cache reads: per-row paths, source folders, labels, sha256, features."""
    with h5py.File(index_file, "r") as f:
        counts = f["source_rows"][...] if "source_rows" in f else None
        source = np.repeat(np.arange(len(counts)), counts) if counts is not None else f["source"][...]
        return (list(f["paths"][...]), [json.loads(f.attrs["sources"])[s] for s in source], f["labels"][...],
                [h.decode() for h in f["sha256"][...]], f["features"][...], f["paths"].is_virtual)


def expected(cache):
    with open_cache(cache) as (_, idx):
        return (idx.paths, [idx.sources[s] for s in idx.source], idx.labels, idx.sha256,
                read_features(cache, view=None))


def check(index_file, want):
    paths, sources, labels, sha, x, _ = plain(index_file)
    assert paths == want[0] and sources == want[1] and sha == want[3]
    np.testing.assert_array_equal(labels, want[2])
    np.testing.assert_array_equal(x, want[4])


def test_plain_h5py_reads_paths_from_the_index(tmp_path, monkeypatch):
    """Two source folders (the second's shard numbers its folder 0, the index 1), a changed file, a failure and a
    pruned file: the logical rows are runs over four shards, and plain h5py sees exactly the library's rows."""
    cache = tmp_path / "a" / "c.h5"
    history(cache)
    rows = rows_for(["c.jpg"], 700)
    rows.paths = [b"\xff-not-utf8.jpg"]  # any name round-trips
    write_part(cache, "part-005", PROV, "/other", rows, {}, (1, D))
    finish(cache, PROV, {})
    want = expected(cache)
    assert "/other" in want[1] and b"\xff-not-utf8.jpg" in want[0]  # the case a shard-local source would get wrong
    *_, virtual = plain(cache)
    assert virtual
    check(cache, want)
    shutil.move(tmp_path / "a", tmp_path / "b")  # mapped relative to the index: a moved folder still reads
    monkeypatch.chdir(tmp_path)
    check(tmp_path / "b" / "c.h5", want)


def test_the_same_code_reads_a_compacted_single_file(tmp_path):
    """`compact --single` leaves a schema-1 file with real columns: `paths` and the per-row `source` read the same."""
    cache = tmp_path / "c.h5"
    history(cache)
    want = expected(cache)
    compact(cache, {}, single=True)
    *_, virtual = plain(cache)
    assert not virtual
    check(cache, want)
