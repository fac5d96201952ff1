"""Hardening round 3 (issue 20): crafted cache columns and chunking, non-finite test features, ensembles with
--tta, fit's empty splits, predict without the extract lock, and file modes kept across a replace. Every crafted file
is built here from the real cache and head of tests/hostile/test_crafted_files.py's `base`."""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import TINY, draw
from tests.hostile.test_crafted_files import FIT, build_base, craft_cache, refused

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("cache/features.h5")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """test_crafted_files' material without the export (not needed here). Read-only for tests."""
    return build_base(tmp_path_factory.mktemp("base"), export=False)


def run_limited(args: list[str], memory: int) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose address space is capped: an unbounded allocation fails there, not here."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "catdog_cache", *args], capture_output=True, text=True, env=env,
                          preexec_fn=cap, timeout=120)


# ---------------------------------------------------------------- 6. string lengths fixed and bounded

@pytest.mark.parametrize("width", [65, 268435456])
def test_sha256_of_another_width_is_refused(base, width):
    """`S268435456`: 8 rows declare 2 GiB in a 140 KB file (chunks never written). Before: info peaked at 2.4 GB
    (S2147483647: 18.9 GB, 188 s); now refused before reading, in a process capped at 1.5 GiB."""
    craft_cache(base.cache, CACHE, {"sha256": lambda g, ds: g.create_dataset(
        "sha256", shape=ds.shape, dtype=f"S{width}", chunks=(1,))})
    assert CACHE.stat().st_size < 2**20
    r = run_limited(["info"], 3 << 29)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "sha256" in r.stderr and "S64" in r.stderr, r.stderr


def _same_heap_object(name: str, length: int):
    """A variable-length column whose every row points at one `length`-byte heap object: the file holds it once,
    a reader would allocate it once per row."""
    def make(g, ds):
        n = ds.shape[0]
        g.create_dataset(name, data=np.array([b"x" * length] + [b"y"] * (n - 1), dtype=object),
                         dtype=h5py.vlen_dtype(bytes))
    return make


def _point_rows_at_row_0(path: Path, name: str) -> None:
    with h5py.File(path, "r") as f:
        ds = f[name]
        offset, n, item = ds.id.get_offset(), ds.shape[0], ds.id.get_storage_size() // ds.shape[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        first = fh.read(item)
        fh.seek(offset)
        fh.write(first * n)


def test_paths_pointing_at_one_large_object_are_refused(cli, base):
    craft_cache(base.cache, CACHE, {"paths": _same_heap_object("paths", 100_000)})
    _point_rows_at_row_0(CACHE, "paths")
    with h5py.File(CACHE, "r") as f:  # the crafted file expands as crafted
        assert [len(p) for p in f["paths"][:]] == [100_000] * 8
    size = CACHE.stat().st_size
    assert size < 8 * 100_000
    for args in (["info"], ["fit", *FIT]):
        refused(cli(*args, ok=False), "cannot hold")


def test_scalar_attributes_only(cli, base):
    """An attribute array of variable-length strings is the same bomb as a column: only single values are read."""
    craft_cache(base.cache, CACHE)
    with h5py.File(CACHE, "r+") as f:
        prov = f.attrs["provenance"]
        f.attrs["provenance"] = np.array([prov, prov], dtype=h5py.string_dtype())
    refused(cli("info", ok=False), "single value")


# ---------------------------------------------------------------- 15. exact dtypes per column

def _column(name: str, dtype, value):
    def make(g, ds):
        g.create_dataset(name, data=np.array([value] * ds.shape[0], dtype=object) if dtype is not None else
                         np.array([value] * ds.shape[0]), dtype=dtype)
    return make


def _vlen_ints(name: str):
    def make(g, ds):
        data = np.empty(ds.shape[0], dtype=object)
        for i in range(len(data)):
            data[i] = np.arange(3, dtype=np.int32)
        g.create_dataset(name, data=data, dtype=h5py.vlen_dtype(np.int32))
    return make


@pytest.mark.parametrize(("name", "make"), [
    ("sha256", _vlen_ints("sha256")),
    ("paths", _vlen_ints("paths")),
    ("sha256", _column("sha256", h5py.string_dtype(), "0" * 64)),
    ("labels", _column("labels", None, np.int64(0))),
    ("source", _column("source", None, np.int32(0))),
], ids=["sha256-vlen-int", "paths-vlen-int", "sha256-vlen-str", "labels-int64", "source-int32"])
def test_columns_of_another_type_are_refused(cli, base, name, make):
    craft_cache(base.cache, CACHE, {name: make})
    for args in (["info"], ["fit", *FIT]):
        r = refused(cli(*args, ok=False), "expected")
        assert name in r and "AttributeError" not in r


def test_chunked_columns_are_refused(cli, base):
    craft_cache(base.cache, CACHE, {"labels": lambda g, ds: g.create_dataset("labels", data=ds[:], chunks=(1,))})
    refused(cli("info", ok=False), "chunked")


# ---------------------------------------------------------------- 7. whole-row chunks of a sane size

@pytest.mark.parametrize("chunks", [(1, 1, 1), (8, 1, 64), (1, 1, 4096)], ids=["1x1x1", "part-rows", "one-row"])
def test_features_in_tiny_chunks_are_refused(cli, base, chunks):
    """1x1x1 chunks of a 256 x 4096 cache (a 63 MB file): fit took 33 s and 4.8 GB before; now one line at once."""
    craft_cache(base.cache, CACHE, {"features": lambda g, ds: g.create_dataset(
        "features", data=ds[...], chunks=chunks)})
    for args in (["info"], ["fit", *FIT]):
        refused(cli(*args, ok=False), "chunks")


def test_what_the_writer_makes_is_accepted(cli, base, tmp_path):
    """One row (chunks of 1), no row at all (contiguous, a part of failures only), contiguous features."""
    from catdog_cache.cache import read_index, shards_dir

    craft_cache(base.cache, CACHE, {"features": lambda g, ds: g.create_dataset("features", data=ds[...])})
    assert read_index(CACHE).shape[0] == 8
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "cat.0.jpg").write_bytes((base.train / "cat.0.jpg").read_bytes())
    (folder / "cat.1.jpg").write_bytes(b"not a jpeg")
    cli("extract", folder, *TINY, "--cache", "one.h5", "--quiet")
    (shard,) = shards_dir(Path("one.h5")).glob("*.h5")  # the rows live in the run's shard; one.h5 is its index
    with h5py.File(shard, "r") as f:
        assert f["features"].chunks == (1, 1, 4096)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cat.0.jpg").write_bytes(b"not a jpeg either")
    cli("extract", bad, *TINY, "--cache", "one.h5", "--quiet")  # its part holds no row: contiguous features
    assert len(read_index("one.h5").failed) == 2


# ---------------------------------------------------------------- 21. a replaced file keeps its mode and group

def test_replaced_files_keep_mode_and_group(cli, base, tmp_path):
    """An append rewrites the cache, a second fit the head and its curve: a 0600 (or 0640, group 4242) file stayed
    so only until then (it came back 0644, root's group)."""
    craft_cache(base.cache, CACHE)
    head, curve = Path("cache/features.head.pt"), Path("cache/features.head.png")
    cli("fit", *FIT)
    for p, mode in ((CACHE, 0o600), (head, 0o640), (curve, 0o604)):
        os.chmod(p, mode)
        os.chown(p, -1, 4242)
    more = tmp_path / "more"
    draw(more / "cat.9.jpg", "cat", 900)
    cli("extract", more, *TINY, "--quiet")
    cli("fit", *FIT)
    for p, mode in ((CACHE, 0o600), (head, 0o640), (curve, 0o604)):
        st = p.stat()
        assert (oct(st.st_mode & 0o7777), st.st_gid) == (oct(mode), 4242), p
    with h5py.File(CACHE, "r") as f:
        assert f["labels"].shape == (9,)  # it was replaced
    new = Path("new.csv")  # a new file still gets the umask's mode
    from catdog_cache.files import umask, write_atomic

    write_atomic(new, b"x")
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask()


# ---------------------------------------------------------------- 11. an ensemble's views under --tta

def test_ensemble_tta_uses_the_views_every_backbone_has(cli, base, tmp_path):
    """center,flip + center: --tta was a ValueError in concatenate; it averages the shared views, so here (one
    shared view) it is refused in one line. center,flip + center,flip (two seeds) averages both views."""
    craft_cache(base.cache, CACHE)
    flips = []
    for seed in ("0", "1"):
        flips.append(Path(f"cache/flip{seed}.h5"))
        cli("extract", base.train, "--backbone", "tiny", "--weights", "random", "--seed", seed,
            "--views", "center,flip", "--cache", flips[-1], "--quiet")
    cli("fit", "--cache", flips[0], "--cache", CACHE, "--head", "mixed.pt", *FIT)
    r = refused(cli("predict", base.test, "--head", "mixed.pt", "--tta", ok=False), "--tta")
    assert "share one view" in r and "center,flip / center" in r
    cli("fit", "--cache", flips[0], "--cache", flips[1], "--head", "both.pt", *FIT)
    r = cli("predict", base.test, "--head", "both.pt", "--tta", "--out", "tta.csv", "--json")
    assert '"center", "flip"' in r.output or '"center","flip"' in r.output.replace(" ", ""), r.output
    cli("predict", base.test, "--head", "both.pt", "--out", "plain.csv")
    tta, plain = (Path(p).read_text().splitlines()[1:] for p in ("tta.csv", "plain.csv"))
    assert len(tta) == len(plain) == 3 and tta != plain


# ---------------------------------------------------------------- 18. non-finite test features

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_test_features_are_refused(cli, base, tmp_path, value):
    """A test-feature cache with a NaN (or inf) row: predict exited 0 with `nan` probabilities and `1,nan` in the
    submission; preview drew it. Now one line naming the cache and the file, and no CSV."""
    cache = tmp_path / "test.h5"
    cli("predict", base.test, "--head", base.head, "--cache", cache, "--out", "first.csv")
    with h5py.File(cache, "r+") as f:
        f["features"][1, 0, 5] = value
    r = refused(cli("predict", base.test, "--head", base.head, "--cache", cache, "--submission", "sub.csv",
                    "--out", "p.csv", ok=False), "NaN or infinite")
    assert "2.jpg" in r and str(cache) in r
    assert not Path("sub.csv").exists() and not Path("p.csv").exists()
    refused(cli("preview", base.test, "--head", base.head, "--cache", cache, "--out", "p.png", ok=False),
            "NaN or infinite")


# ---------------------------------------------------------------- 19. fit without training or validation rows

def test_fit_without_training_rows_says_so(cli, base):
    craft_cache(base.cache, CACHE)
    r = refused(cli("fit", "--val-fraction", "0.999", *FIT, ok=False), "no training rows")
    assert "diverged" not in r and "--val-fraction" in r
    assert not Path("cache/features.head.pt").exists()


def test_keep_best_without_validation_is_refused(cli, base):
    """--keep best --val-fraction 0 said "kept epoch 1 (lowest validation log loss)" without any validation."""
    craft_cache(base.cache, CACHE)
    r = refused(cli("fit", "--keep", "best", "--val-fraction", "0", *FIT, ok=False), "--keep best")
    assert "validation" in r
    assert not Path("cache/features.head.pt").exists()
    cli("fit", "--keep", "best", *FIT)  # with a validation split: allowed


# ---------------------------------------------------------------- 20. predict reads a complete cache without the lock

@pytest.fixture
def two_heads(cli, base):
    """The base cache in this folder and two heads trained on it (predict's test cache goes beside them)."""
    craft_cache(base.cache, CACHE)
    cli("fit", *FIT, "--head", "cache/a.head.pt")
    cli("fit", *FIT, "--seed", "1", "--head", "cache/b.head.pt")
    return Path("cache/a.head.pt"), Path("cache/b.head.pt")


def test_nothing_to_extract_takes_no_lock(cli, base, two_heads, monkeypatch):
    """A head on read-only media failed ("Read-only file system: ...lock") even with every feature cached: once
    the folder is cached, predict and preview never open the lock (here: opening it fails the test)."""
    extract_module = importlib.import_module("catdog_cache.extract.finish")  # where the run takes the lock

    a, b = two_heads
    cli("predict", base.test, "--head", a, "--out", "a.csv")  # caches test1 beside the heads
    cli("preview", base.train, "--head", a, "--out", "a.png")  # the training cache holds the train folder

    def no_lock(cache):
        raise AssertionError(f"the lock of {cache} was taken with nothing to extract")

    monkeypatch.setattr(extract_module, "locked", no_lock)
    r = cli("predict", base.test, "--head", b, "--out", "b.csv", "--json")
    assert '"extracted": 0' in r.output
    cli("preview", base.test, "--head", b, "--out", "b.png")
    cli("preview", base.train, "--head", b, "--out", "t.png")
    draw(base.test.parent / "more" / "1.jpg", "cat", 1)  # a new image still needs the lock: the error says so
    with pytest.raises(AssertionError, match="the lock"):
        from catdog_cache.score.predict import predict

        predict(base.test.parent / "more", b, "m.csv")


def test_predict_waits_for_another_extract(cli, base, two_heads, tmp_path, monkeypatch):
    """Two predicts on one folder: the second failed at once ("in use by another extract"), even with nothing left
    to extract. Now a cached folder needs no lock, and a missing one waits for the lock (CATDOG_LOCK_WAIT)."""
    import threading

    from catdog_cache.cache import locked
    from catdog_cache.score.predict import predict

    a, b = two_heads
    cli("predict", base.test, "--head", a, "--out", "a.csv")
    test_cache = next(Path("cache").glob("test1.*.h5"))
    with locked(test_cache):  # someone extracts into it: a cached folder is read anyway
        cli("predict", base.test, "--head", b, "--out", "b.csv")
    folder = tmp_path / "new"
    draw(folder / "1.jpg", "dog", 7)
    new_cache = Path("new.h5")
    monkeypatch.setenv("CATDOG_LOCK_WAIT", "0.5")
    with locked(new_cache):
        refused(cli("predict", folder, "--head", b, "--cache", new_cache, "--out", "n.csv", ok=False), "waited")
    monkeypatch.setenv("CATDOG_LOCK_WAIT", "60")
    held, stages = threading.Event(), []

    def hold() -> None:
        with locked(new_cache):
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    report = predict(folder, b, "n.csv", cache=new_cache, progress=lambda s, d, t: stages.append(s))
    holder.join()
    assert "waiting" in stages and report.extracted == 1 and len(report.rows) == 1


def test_two_concurrent_predicts_on_one_folder(cli, base, two_heads, tmp_path):
    """Two processes, two heads, one uncached folder: both succeed; the images go through the backbone once."""
    a, b = two_heads
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "catdog_cache", "predict", str(base.test), "--head", str(h),
                               "--out", f"{h.stem}.csv", "--json", "--workers", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for h in (a, b)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(json.loads(out)["extracted"] for out, _ in outs) == 3, outs
