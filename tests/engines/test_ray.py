"""extract --engine ray on a local Ray (2 CPUs, shared by this module's tests): the same cache as one process, a
killed worker process costs nothing, a rerun reads no image; the per-shard markers are checked like hostile files."""

import dataclasses
import json
import os
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from catdog_cache.backbone import parse_weights
from catdog_cache.cache import Recorded, list_parts, listed, parts_dir, read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import CacheError, InputError
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.folder_units import cut_folder, unit_done
from catdog_cache.extract.markers import markers_dir, read_marker
from catdog_cache.extract.plan import Known
from tests.conftest import TINY, class_folder, jpeg

CFG = ExtractConfig(weights=parse_weights("random", 0), backbone="tiny", batch_size=2, workers=0, device="cpu")


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'catdog-cache[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = class_folder(tmp_path_factory.mktemp("ray") / "data", 9)
    old = time.time_ns() - 60 * 10**9  # settled files: their stats are trusted, not racy (rerun.py; a Ray unit is
    for path in root.rglob("*.jpg"):  # done only when every file passes the local engine's stat rule)
        os.utime(path, ns=(old, old))
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ref") / "one.h5"
    extract(data, cache, CFG)
    return cache


def run(data, cache, **opts):
    from catdog_cache.engines.ray_pool import RayOptions

    return extract(data, cache, CFG, engine="ray", ray=RayOptions(**{"shard_size": 4, "actors": 1, **opts}))


def assert_same(a: Path, b: Path):
    ia, ib = read_index(a), read_index(b)
    assert ia.paths == ib.paths and len(set(ib.paths)) == len(ib.paths)  # every row once
    assert ia.labels.tolist() == ib.labels.tolist() and ia.sources == ib.sources and ia.provenance == ib.provenance
    assert [f[1:] for f in ia.failed] == [f[1:] for f in ib.failed]
    np.testing.assert_allclose(read_features(a), read_features(b), atol=1e-5)


def test_same_cache_as_one_process_and_a_rerun_reads_nothing(ray, data, reference, tmp_path):
    cache = tmp_path / "ray.h5"
    r = run(data, cache)
    assert (r.shards, r.shards_run, r.extracted, len(r.failed)) == (5, 5, 18, 1)
    assert_same(reference, cache)
    assert not list_parts(cache, clean=False) and len(list(markers_dir(cache).glob("*.json"))) == 5
    assert (read_index(cache).stat[:, 2] > 0).all()  # the tasks record the driver's walk's stats, as one process

    # same size and mtime, other bytes, the same inode: ctime moved (no user call sets it back), so that file's
    # unit runs (it was "done" by size and mtime before); its task decides by extract's rule, the others are done
    victim = data / "cat" / "5.jpg"
    st, original = victim.stat(), victim.read_bytes()
    try:
        victim.write_bytes(b"\0" * st.st_size)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        again = run(data, cache)
        assert (again.shards_run, again.extracted, again.reused) == (1, 0, 18)
        assert 1 <= again.hashed <= 4  # at most its own unit's files read
        assert [f[0] for f in again.failed] == ["cat/5.jpg"]  # now a failure record, as one process would say
        assert again.failed_before == r.failed  # the broken file is still reported, from the index
        victim.write_bytes(original)  # back: its unit runs again and the row is the reference's
        back = run(data, cache)
        assert (back.shards_run, back.extracted) == (1, 1)
        assert_same(reference, cache)
    finally:
        victim.write_bytes(original)


def test_killed_worker_process_is_retried_without_loss_or_duplicates(ray, data, reference, tmp_path, monkeypatch):
    """Shard 1's first attempt dies after its first batch, shard 3's between writing its part and its marker (the
    retry writes a part of its own: the first one's rows are superseded, never read twice)."""
    flags = [tmp_path / "killed-1", tmp_path / "killed-3"]
    monkeypatch.setenv("CATDOG_RAY_KILL", f"1:batch:{flags[0]},3:marker:{flags[1]}")
    cache = tmp_path / "ray.h5"
    r = run(data, cache)
    assert all(f.exists() for f in flags)  # both kills happened
    assert (r.shards_run, r.extracted, len(r.failed)) == (5, 18, 1)
    assert len(listed(cache)[1].names) == 6  # shard 3's first part too, under its own name: superseded rows
    assert_same(reference, cache)


def test_finished_parts_are_kept_and_skipped_until_assembled(ray, data, reference, tmp_path, monkeypatch, cli):
    """A driver that died after its tasks: parts and markers are on disk, nothing assembled. The rerun runs no task
    and assembles them."""
    from catdog_cache.engines import ray_folder as engine_ray

    def driver_dies(*args, **kwargs):
        raise RuntimeError("driver died")

    cache = tmp_path / "ray.h5"
    with monkeypatch.context() as m:
        m.setattr(engine_ray, "finish_run", driver_dies)
        with pytest.raises(RuntimeError, match="driver died"):
            run(data, cache)
    assert len(list(parts_dir(cache).glob("*.h5"))) == 5 and not cache.exists()
    out = cli("extract", data, "--cache", cache, "--engine", "ray", "--shard-size", "4", "--json").output
    r = json.loads(out)
    assert (r["shards"], r["shards_run"], r["rows"], r["extracted"], r["reused"]) == (5, 0, 18, 0, 19)
    assert not list_parts(cache, clean=False)  # all listed in the index
    assert_same(reference, cache)


def test_markers_are_checked_like_hostile_files(data, tmp_path):
    """No Ray needed: a damaged, foreign or oversized marker means 'not done'; a symlinked folder is refused."""
    from catdog_cache.sources.folder import discover

    disc = discover(data)
    prov = CFG.provenance()
    shards = cut_folder(disc.root, disc.samples, str(disc.root), prov, 4, stat=disc.stat)
    cache = tmp_path / "c.h5"
    paths = [os.fsencode(s.rel) for s in disc.samples]  # every file recorded with its content, as the walk saw it
    everything = Known(files=Recorded(paths, ["0" * 64] * len(paths), disc.stat))
    folder = markers_dir(cache)
    folder.mkdir()
    marker = folder / f"{shards[0].name}.json"
    good = f'{{"version": 1, "identity": "{shards[0].identity}", "part": "", "rows": 3, "failures": 1}}'
    marker.write_text(good)
    assert unit_done(cache, shards[0], everything) and not unit_done(cache, shards[0], Known())
    unstated = cut_folder(disc.root, disc.samples, str(disc.root), prov, 4)[0]  # no walk's stats: proves nothing
    assert unstated.identity == shards[0].identity and not unit_done(cache, unstated, everything)
    for bad in ["{", "[]", good.replace('"rows": 3', '"rows": "3"'), good.replace('"part": ""', '"part": "../x"'),
                good.replace(shards[0].identity, shards[1].identity), good + " " * 70000]:
        marker.write_text(bad)
        assert read_marker(cache, shards[0].name) is None or not unit_done(cache, shards[0], everything)
    # a changed mtime is a new identity; the slices cover the folder once, in order
    again = cut_folder(disc.root, disc.samples, str(disc.root), prov, 4)
    assert [s.identity for s in again] == [s.identity for s in shards]
    assert [x for s in shards for x in s.samples] == disc.samples
    st = (data / "cat" / "0.jpg").stat()
    os.utime(data / "cat" / "0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    try:
        assert cut_folder(disc.root, disc.samples, str(disc.root), prov, 4)[0].identity != shards[0].identity
    finally:
        os.utime(data / "cat" / "0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CacheError, match="symbolic link"):
        read_marker(cache, shards[0].name)


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    from catdog_cache.engines.ray_pool import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(InputError, match=r"pip install 'catdog-cache\[ray\]'"):
        require_ray()


def test_engine_options_are_checked_before_any_work(cli, kaggle_dir, monkeypatch):
    def refused(*args):
        r = cli("extract", kaggle_dir, *TINY, *args, ok=False)
        assert r.exit_code == 1, r.output
        assert not Path("cache").exists()  # nothing written, no lock left
        return r.output.strip().splitlines()[-1]

    assert refused("--engine", "spark") == "error: --engine: expected local or ray, got 'spark'"
    assert refused("--shard-size", "8") == "error: --shard-size is an option of --engine ray (this run uses the " \
        "local engine)"
    present = find_spec("os")  # whether or not Ray is installed here: first as if it were, then as if not
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: present if name == "ray" else find_spec(name, *a))
    assert "--shard-size must be at least 1" in refused("--engine", "ray", "--shard-size", "0")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert refused("--engine", "ray") == "error: --engine ray needs Ray, which is not installed: " \
        "pip install 'catdog-cache[ray]'"


def test_tar_shards_one_task_each_killed_attempt_retried(ray, tmp_path, monkeypatch, cli):
    """Tar input on Ray: one task per tar shard; shard 1's first attempt dies after writing a part (before its
    marker), the retry supersedes those rows; the cache equals the local engine's row for row, and a rerun runs no
    task. --classes reaches the actors."""
    from catdog_cache.engines.ray_pool import RayOptions
    from tests.extract.test_tars import make_tar

    drawn = tmp_path / "drawn"
    shards = []
    for s in range(3):
        members = []
        for i in range(4):
            members += [(f"s{s}/{i}.jpg", jpeg("cat" if i % 2 else "dog", 10 * s + i, drawn)),
                        (f"s{s}/{i}.cls", str((s + i) % 3).encode())]
        shards.append(make_tar(tmp_path / "shards" / f"train-{s}.tar", members))
    spec = str(tmp_path / "shards" / "train-{0..2}.tar")
    cfg = dataclasses.replace(CFG, part_rows=2)
    extract(spec, tmp_path / "local.h5", cfg, classes=["a", "b", "c"])
    flag = tmp_path / "killed-1"
    monkeypatch.setenv("CATDOG_RAY_KILL", f"1:part:{flag}")
    cache = tmp_path / "ray.h5"
    r = extract(spec, cache, cfg, classes=["a", "b", "c"], engine="ray", ray=RayOptions(actors=1))
    assert flag.exists() and (r.shards, r.shards_run, r.extracted) == (3, 3, 12)
    assert_same(tmp_path / "local.h5", cache)
    assert read_index(cache).classes == ["a", "b", "c"]
    out = cli("extract", spec, "--cache", cache, "--engine", "ray", "--json").output
    r2 = json.loads(out)
    assert (r2["shards_run"], r2["extracted"], r2["reused"], r2["rows"]) == (0, 0, 12, 12)
