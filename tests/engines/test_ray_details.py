"""What a new user of `--engine ray` met (issue 29, item 7): the default --shard-size left every file to one actor;
Ray's start-up warning (and colour codes) reached a log file; the default --batch-size (0: auto) failed every task;
the summary said "the others were done already" with no others. Ctrl-C on a new cache leaving an index of the saved
units is tests/engines/test_interrupts.py's (every engine x source)."""

import os
import re
import subprocess
import sys
import time
from importlib.util import find_spec

import pytest

from catdog_cache.cache import read_index
from catdog_cache.engines.ray_pool import MAX_AUTO_SHARD, MIN_AUTO_SHARD, auto_shard_size
from catdog_cache.machine import affinity_cores
from tests.conftest import TINY, class_folder

NO_RAY = "Ray is not installed (pip install 'catdog-cache[ray]')"
CPUS = affinity_cores()


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason=NO_RAY)
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)  # as the CLI's local Ray: this machine
    yield ray
    ray.shutdown()


def test_auto_shard_size_gives_every_actor_a_few_units():
    assert auto_shard_size(1000, 2) == 125  # 8 units: 4 per actor (was one unit of 1,000 files: one actor)
    assert auto_shard_size(1000, 1000) == MIN_AUTO_SHARD  # never a task per file
    assert auto_shard_size(10**7, 4) == MAX_AUTO_SHARD  # a retry redoes at most this many
    for files, actors in [(70, 2), (999, 3), (5000, 16)]:
        size = auto_shard_size(files, actors)
        assert -(-files // size) >= min(actors, -(-files // MIN_AUTO_SHARD))  # a unit for every actor that fits


@pytest.mark.skipif(find_spec("ray") is None, reason=NO_RAY)
@pytest.mark.skipif(CPUS < 2, reason="one CPU: a local Ray holds one actor")
def test_defaults_use_every_actor_and_the_log_stays_plain(tmp_path, ray, cli):
    """A real `extract --engine ray` process with every default (shard size, batch size), its output piped to files
    as a log is: every actor gets units, the rows are one process's, nothing of Ray's start-up is in the log."""
    data = class_folder(tmp_path / "data", 35)  # 70 photos and a broken file
    old = time.time_ns() - 60 * 10**9  # settled stats: the in-process rerun trusts them (rerun.py)
    for path in data.rglob("*.jpg"):
        os.utime(path, ns=(old, old))
    cache, one = tmp_path / "ray.h5", tmp_path / "one.h5"
    cli("extract", data, "--cache", one, *TINY, "--device", "cpu", "--quiet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "catdog_cache", "extract", str(data), "--cache", str(cache), *TINY,
                        "--device", "cpu", "--engine", "ray"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\x1b" not in r.stdout + r.stderr and "Token authentication" not in r.stderr, r.stderr[-2000:]
    assert "WARNING" not in r.stderr and "INFO" not in r.stderr, r.stderr[-2000:]
    m = re.search(r"ray: (\d+) of (\d+) input shards of (\d+) files run on (\d+) actors\n", r.stdout)
    assert m, r.stdout
    run, shards, size, actors = map(int, m.groups())
    assert run == shards == -(-71 // size) and actors == min(CPUS, shards) >= 2, r.stdout
    assert "done already" not in r.stdout  # none were
    a, b = read_index(cache), read_index(one)
    assert sorted(a.paths) == sorted(b.paths) and len(a.paths) == 70

    again = cli("extract", data, "--cache", cache, *TINY, "--device", "cpu", "--engine", "ray").output
    assert f"ray: all {shards} input shards were done already; no task ran" in again  # the same units: same size
