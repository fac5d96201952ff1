"""Crash safety with real processes: SIGKILL at several moments, SIGINT, and the rerun that follows."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from catdog_cache.cache import list_parts, parts_dir, read_features, read_index
from tests.conftest import TINY, draw

# --device cpu: the reruns are compared bit for bit with one reference run; on a GPU, cudnn.benchmark may pick another
# kernel per process or batch shape (a resumed batch can be smaller), which is rounding, not a resume bug
ARGS = [*TINY, "--workers", "0", "--batch-size", "2", "--part-rows", "4", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash") / "data"
    for i in range(30):
        draw(root / f"cat.{i}.jpg", "cat", i)
        draw(root / f"dog.{i}.jpg", "dog", 1000 + i)
    (root / "cat.999.jpg").write_bytes(b"corrupt")
    return root


@pytest.fixture(scope="module")
def reference(big_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ref") / "ref.h5"
    run(big_dir, cache).check_returncode()
    return read_index(cache), read_features(cache)


def start(data, cache, *extra):
    env = {**os.environ, "CATDOG_BATCH_DELAY": "0.05"}
    return subprocess.Popen([sys.executable, "-m", "catdog_cache", "extract", str(data), "--cache", str(cache), *ARGS,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def run(data, cache):
    return subprocess.run([sys.executable, "-m", "catdog_cache", "extract", str(data), "--cache", str(cache), *ARGS],
                          capture_output=True, text=True)


def wait_for_parts(cache, n, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(parts_dir(cache).glob("*.h5"))) >= n:
            return
        time.sleep(0.02)
    raise AssertionError("no parts appeared")


def assert_same_as_reference(cache, reference):
    idx, feats = read_index(cache), read_features(cache)
    ref_idx, ref_feats = reference
    assert idx.paths == ref_idx.paths and len(set(idx.paths)) == len(idx.paths)  # one row per good image
    assert idx.labels.tolist() == ref_idx.labels.tolist()
    np.testing.assert_array_equal(feats, ref_feats)
    assert (np.abs(feats).sum(1) > 0).all()  # no zero rows
    assert [f[1] for f in idx.failed] == [b"cat.999.jpg"]


@pytest.mark.parametrize("parts_before_kill", [0, 1, 6])
def test_sigkill_then_rerun_completes_without_redoing(big_dir, tmp_path, reference, parts_before_kill):
    cache = tmp_path / "c.h5"
    proc = start(big_dir, cache)
    if parts_before_kill:
        wait_for_parts(cache, parts_before_kill)
    else:
        time.sleep(1.0)  # somewhere in start-up or the first batches
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = list(parts_dir(cache).glob("*.h5")) if parts_dir(cache).exists() else []
    done_before = sum(read_index(p).shape[0] + len(read_index(p).failed) for p in parts)
    r = run(big_dir, cache)
    assert r.returncode == 0, r.stderr
    assert f"reused {done_before}" in r.stdout.replace("\n", " ") or (cache.exists() and done_before == 0)
    assert_same_as_reference(cache, reference)
    assert list_parts(cache) == []  # every saved shard is listed in the index
    r = run(big_dir, cache)
    assert "extracted 0 new" in r.stdout


def test_sigkill_during_assembly_is_recovered(big_dir, tmp_path, reference, monkeypatch):
    """Parts complete, killed before/while merging: a stale .tmp cache and leftover parts are handled."""
    cache = tmp_path / "c.h5"
    run(big_dir, cache).check_returncode()
    cache.with_name(cache.name + ".tmp").write_bytes(b"half-merged garbage")
    r = run(big_dir, cache)
    assert r.returncode == 0
    assert_same_as_reference(cache, reference)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigint_saves_work_and_exits_130(big_dir, tmp_path, reference, workers):
    """Ctrl-C in a terminal signals the whole process group, loader workers included."""
    cache = tmp_path / "c.h5"
    proc = start(big_dir, cache, "--workers", workers)
    wait_for_parts(cache, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"run extract again to resume" in err
    n = read_index(cache).shape[0]  # a valid cache, already assembled
    assert 0 < n <= 60
    r = run(big_dir, cache)
    assert r.returncode == 0
    assert_same_as_reference(cache, reference)
