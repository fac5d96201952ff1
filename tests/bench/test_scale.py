"""bench --only scale (issue 18 item 4): the synthetic sharded cache, the merge's no-sort fast path, and the rows."""

from __future__ import annotations

import re

import numpy as np

from catdog_cache.bench import scale as benchscale
from catdog_cache.cache import open_cache, shards_dir
from catdog_cache.cache.view import _increasing


def test_synthetic_sharded_cache_is_sorted_shards_with_learnable_labels(tmp_path):
    """3 shards of 1024 rows (the last short), in order, one row per path; labels are both classes and follow the
    linear rule (a linear probe on the features separates them)."""
    cache = tmp_path / "features.h5"
    benchscale.synthetic_sharded(cache, 2500, shard_rows=1024)
    assert len(list(shards_dir(cache).glob("*.h5"))) == 3
    with open_cache(cache) as (view, index):
        assert index.shape == (2500, 1, benchscale.DIM) and index.dtype == "float16"
        assert view.shard_rows == [1024, 1024, 452] and len(view.seg_shard) == 3  # one run per shard: no sort
        assert index.paths[0] == b"000000000.jpg" and index.paths[-1] == b"000002499.jpg"
        x = view.read(0, 2500)  # [N, D] float32
    y = index.labels.astype(np.float64)
    assert 0.3 < y.mean() < 0.7
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], 2 * y - 1, rcond=None)
    assert ((np.c_[x, np.ones(len(x))] @ w > 0) == (y > 0)).mean() > 0.95


def test_increasing_compares_folder_then_path():
    src = np.array([0, 0, 1, 1])
    assert _increasing(src, [b"b", b"c", b"a", b"b"])  # a new folder may start lower
    assert not _increasing(src, [b"b", b"b", b"a", b"b"])  # a repeated key
    assert not _increasing(np.array([1, 0]), [b"a", b"b"])  # folders out of order
    assert not _increasing(np.array([1, 0], np.uint16), [b"a", b"b"])  # a lean index's folders: no wrap-around
    assert not _increasing(np.array([0, 0]), [b"b", b"a"])
    assert _increasing(np.array([0]), [b"a"]) and _increasing(np.zeros(0, np.int64), [])


def test_bench_scale_rows(tmp_path, monkeypatch):
    """One small size end to end (fresh processes): every row reported, the two budgets' heads compared."""
    rows = benchscale.run([3000], lambda r: None, "1M", epochs=1, folder=tmp_path, budgets=("1M", "512M"))
    got = {what: (value, note) for what, value, note in rows}
    assert got["scale 3,000 rows: head with 1M vs 512M of chunks"][0] == "identical"
    fit_value, fit_note = got["scale 3,000 rows: streamed fit, 1M of chunks"]
    assert fit_value.endswith("us/row") and "streamed True" in fit_note
    growth, note = got["scale 3,000 rows: peak RSS growth"]
    assert growth.endswith(" MiB") and re.search(r"--max-memory 2M \(1M of chunks \+ the index", note)
    assert "ms/shard" in got["scale 3,000 rows: open"][1]
    assert list(tmp_path.iterdir()) == []  # the synthetic cache is deleted


def test_bench_scale_bad_rows(cli):
    r = cli("bench", "--only", "scale", "--scale-rows", "10,x", ok=False)
    assert r.exit_code != 0 and "--scale-rows" in r.output and "Traceback" not in r.output


def test_bench_scale_keep_reuses_a_finished_cache(tmp_path):
    """--scale-keep: the cache stays (with its DONE marker) and a second run reuses it instead of writing; an
    unfinished one (no DONE: a killed write) is written again."""
    first = benchscale.run([1500], lambda r: None, "1M", folder=tmp_path, budgets=None, keep=True)
    cache, done = benchscale.kept_cache(tmp_path, 1500, 1024)
    assert done and cache.is_file() and first[0][1].endswith(" s")
    assert not list(cache.parent.glob("*.pt"))  # the heads go, the cache stays
    again = benchscale.run([1500], lambda r: None, "1M", folder=tmp_path, budgets=None, keep=True)
    assert again[0][1] == "kept" and str(cache) in again[0][2]
    (cache.parent / "DONE").unlink()
    third = benchscale.run([1500], lambda r: None, "1M", folder=tmp_path, budgets=None, keep=True)
    assert third[0][1] != "kept" and benchscale.kept_cache(tmp_path, 1500, 1024)[1]


def test_bench_scale_keep_needs_a_folder(cli):
    r = cli("bench", "--only", "scale", "--scale-rows", "1000", "--scale-keep", ok=False)
    assert r.exit_code != 0 and "--scale-dir" in r.output and "Traceback" not in r.output
