"""Feature rows read with pread past HDF5 (cache/chunk_reads.py): the same values as HDF5 reads, every layout our writer
makes, a fallback for what it does not cover, and a crafted or changed file refused."""

import h5py
import numpy as np
import pytest

from catdog_cache.cache.chunk_reads import Direct, chunk_map
from catdog_cache.errors import CacheError


def shard(path, x, chunks=True):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=x, chunks=(min(64, len(x)), *x.shape[1:]) if chunks else None)
    return path


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("chunks", [True, False])
def test_direct_reads_equal_hdf5(tmp_path, dtype, chunks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 1, 24)).astype(dtype)  # 150 rows: the last 64-row chunk is partial
    p = shard(tmp_path / "s.h5", x, chunks)
    d = Direct([p], [p.stat().st_size])
    for r0, n in ((0, 150), (10, 100), (60, 8), (128, 22), (149, 1)):
        out = np.empty((n, 24), np.float32)
        d.advise(0, 150, r0, n)  # the kernel starts reading them (a hint: the read below is what counts)
        assert d.read(0, 150, r0, out, {})
        np.testing.assert_array_equal(out, x[r0 : r0 + n, 0].astype(np.float32))
    d.close()


def test_several_views_fall_back_to_hdf5(tmp_path):
    p = shard(tmp_path / "s.h5", np.zeros((70, 2, 8), np.float32))
    assert chunk_map(p, 70, p.stat().st_size) is None
    assert not Direct([p], [p.stat().st_size]).read(0, 70, 0, np.empty((5, 8), np.float32), {})


def test_changed_or_crafted_shard_is_refused(tmp_path):
    x = np.ones((130, 1, 16), np.float32)
    p = shard(tmp_path / "s.h5", x)
    size = p.stat().st_size
    with pytest.raises(CacheError, match="changed while reading"):  # the index recorded another size
        Direct([p], [size + 1]).read(0, 130, 0, np.empty((4, 16), np.float32), {})
    with pytest.raises(CacheError, match="not stored as catdog-cache stores it"):  # a chunk past the file's end
        chunk_map(p, 130, size - 1000)
    with pytest.raises(CacheError, match="changed while reading"):  # rows other than the index's
        chunk_map(p, 131, size)


def test_runs_cover_exactly_the_rows_asked_for():
    """View.runs stops at the last run it needs (it walked every later run: O(shards) per chunk read)."""
    from catdog_cache.cache.view import View

    rows = [5, 0, 7, 3, 9]
    seg_start = np.cumsum([0] + [r for r in rows if r])
    view = View(None, [], rows, seg_start, np.array([0, 2, 3, 4]), np.zeros(4, np.int64))
    view.index = type("I", (), {"shape": (24, 1, 4)})()
    owner = np.concatenate([np.full(r, i) for i, r in enumerate(rows)])
    for lo in range(25):
        for hi in range(lo, 26):
            got = view.runs(lo, hi)
            assert sum(n for *_, n in got) == max(min(hi, 24) - lo, 0)
            assert all(owner[start] == s for s, _, start, _ in got) and len(got) <= len(set(owner[lo:hi].tolist()))


def test_a_shard_of_another_width_is_refused(tmp_path):
    p = shard(tmp_path / "s.h5", np.ones((64, 1, 16), np.float32))
    with pytest.raises(CacheError, match="changed while reading"):
        Direct([p], [p.stat().st_size]).read(0, 64, 0, np.empty((4, 32), np.float32), {})


def test_shard_swapped_after_open_is_refused(tmp_path):
    """A shard replaced by another HDF5 file of the same size between reads: its rows were read silently (the cached
    chunk map applied to the new file), and a FIFO in its place must not hang the reader."""
    import os

    from catdog_cache.cache.chunk_reads import identity

    x = np.arange(128 * 16, dtype=np.float32).reshape(128, 1, 16)
    p = shard(tmp_path / "s.h5", x)
    size = p.stat().st_size
    d = Direct([p], [size])
    out = np.empty((4, 16), np.float32)
    assert d.read(0, 128, 0, out, {})
    d.close()  # descriptors dropped (as the LRU drops them), chunk map kept
    os.replace(shard(tmp_path / "t.h5", -x), p)
    assert p.stat().st_size == size
    with pytest.raises(CacheError, match="changed while reading"):
        d.read(0, 128, 0, out, {})
    # swapped before the first read: the identity the view validated is what counts
    with pytest.raises(CacheError, match="changed while reading"):
        Direct([p], [size], [(0, 0, 0)]).read(0, 128, 0, out, {})
    ident = identity(p.stat())
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(CacheError, match="changed while reading"):
        Direct([p], [size], [ident]).read(0, 128, 0, out, {})


def test_hdf5_reader_refuses_a_swapped_shard(tmp_path):
    """View.handle (several views: read through HDF5) reopens a shard by name: a swapped file was read unvalidated."""
    import os

    from catdog_cache.cache.chunk_reads import identity
    from catdog_cache.cache.view import View

    x = np.ones((10, 2, 8), np.float32)
    p = shard(tmp_path / "s.h5", x)
    view = View(None, [p], [10], np.array([0, 10]), np.zeros(1, np.int64), np.zeros(1, np.int64),
                [p.stat().st_size], [identity(p.stat())])
    view.index = type("I", (), {"shape": (10, 2, 8), "dtype": np.float32})()
    np.testing.assert_array_equal(view.read(0, 10, view=1), x[:, 1])
    view.close()
    os.replace(shard(tmp_path / "t.h5", -x), p)
    with pytest.raises(CacheError, match="changed while reading"):
        view.read(0, 10, view=1)
