"""`extract --engine ray` into an S3 bucket (moto's server on localhost): each Ray worker uploads the shards and
markers it made itself (the driver uploads only the index, last), the rows equal a one-process local extract, a
rerun runs no task and uploads nothing, and tar shards read from the same bucket give the rows the local engine
reads from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, jpeg
from tests.engines.test_interrupts import env, kill_all
from tests.extract.test_tars import make_tar

pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
NO_RAY = "Ray is not installed (pip install 'catdog-cache[ray]')"
pytestmark = pytest.mark.skipif(find_spec("ray") is None, reason=NO_RAY)
RAY = ("--engine", "ray", "--actors", "2", "--workers", "0", "--batch-size", "2")


@pytest.fixture(scope="module")
def ray(endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray whose workers reach the S3 API as a cluster's nodes would: from their own environment; their
    user cache folder (where each stages the shards it uploads) is not the driver's."""
    import ray

    workers = tmp_path_factory.mktemp("workers-cache")
    env = {"AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "XDG_CACHE_HOME": str(workers)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield workers
    ray.shutdown()


def rows(cache: str | Path) -> dict[tuple[str, bytes], tuple[int, np.ndarray]]:
    """(source, path) -> (label, features), read through the project's reader (a store cache: its local copy)."""
    from catdog_cache.cache import open_cache
    from catdog_cache.cache.read import read_features
    from catdog_cache.store.staging import readable_cache

    with open_cache(readable_cache(cache)) as (view, idx):
        feats = read_features(view)
        keys = [(idx.sources[s], p) for s, p in zip(idx.source.tolist(), idx.paths, strict=True)]
        assert len(set(keys)) == len(keys), "a row listed twice"
        return {k: (int(label), np.array(f)) for k, label, f in zip(keys, idx.labels.tolist(), feats, strict=True)}


def assert_same_rows(a: str | Path, b: str | Path) -> None:
    got, want = rows(a), rows(b)
    assert sorted(got) == sorted(want) and want
    for k, (label, f) in want.items():
        assert got[k][0] == label
        np.testing.assert_allclose(got[k][1], f, atol=1e-5)  # other batches than one process's


def objects(bucket: str, prefix: str) -> dict[str, str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    found = fs.find(f"{bucket}/{prefix}", detail=True)
    return {p[len(bucket) + 1:]: str(info.get("ETag")) for p, info in found.items()}


def test_ray_workers_write_into_the_bucket(cli, ray, tmp_path: Path, photos: Path, bucket: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from catdog_cache.store import mirror

    uploaded: list[str] = []  # by the driver (this process); the workers' uploads are their own processes'
    real = mirror.upload_file
    monkeypatch.setattr(mirror, "upload_file", lambda fs, local, remote: (uploaded.append(remote),
                                                                          real(fs, local, remote)))
    url = f"s3://{bucket}/run/features.h5"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = cli("extract", photos, "--cache", url, *TINY, *RAY, "--shard-size", "2")
    assert "extracted 6 new" in r.output and "ray: 3 of 3 input shards of 2 files run on 2 actors" in r.output, \
        r.output
    stored = objects(bucket, "run/")
    assert sum(".shards/" in o for o in stored) == 3 and sum(".done/" in o for o in stored) == 3, stored
    assert "run/features.h5" in stored and not any(o.endswith(".lease") for o in stored)
    assert uploaded == [f"{bucket}/run/features.h5"]  # the driver: the index alone; no shard went through it
    assert os.listdir(work) == []  # nothing in the working folder
    folders = list((ray / "catdog-cache" / "store" / "work").glob("*/*"))  # the workers' own staging folders:
    assert len(folders) >= 1 and not [p for p in ray.rglob("*") if p.is_file()]  # emptied as they uploaded
    cli("extract", photos, "--cache", tmp_path / "one.h5", *TINY, "--workers", "0")
    assert_same_rows(url, tmp_path / "one.h5")

    again = cli("extract", photos, "--cache", url, *RAY, "--shard-size", "2")
    assert "extracted 0 new, reused 6" in again.output and "no task ran" in again.output, again.output
    assert objects(bucket, "run/") == stored  # nothing uploaded again, nothing removed


def test_tar_shards_from_the_bucket_into_the_bucket(cli, ray, tmp_path: Path, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for s in range(3):
        members = [(f"{kind}.{s}{i}.jpg", jpeg(kind, 10 * s + i + 500 * (kind == "dog"), tmp_path / "drawn"))
                   for i in range(2) for kind in ("cat", "dog")]
        fs.put_file(str(make_tar(tmp_path / f"train-{s}.tar", members)), f"{bucket}/shards/train-{s}.tar")
    spec, url = f"s3://{bucket}/shards/train-{{0..2}}.tar", f"s3://{bucket}/tars/features.h5"
    r = cli("extract", spec, "--cache", url, *TINY, *RAY)
    assert "extracted 12 new" in r.output and "ray: 3 of 3 input shards run on 2 actors" in r.output, r.output
    assert sum(".done/" in o for o in objects(bucket, "tars/")) == 3
    cli("extract", spec, "--cache", tmp_path / "one.h5", *TINY, "--workers", "0")
    assert_same_rows(url, tmp_path / "one.h5")
    assert "no task ran" in cli("extract", spec, "--cache", url, *RAY).output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_driver_stopped_midway_then_the_rerun_finishes(cli, ray, tmp_path: Path, photos: Path, bucket: str,
                                                       sig: int) -> None:
    """A real `extract --engine ray` process into the bucket, stopped once two units are in the store. Ctrl-C: the
    driver takes them in and uploads an index listing them, the folder marked incomplete. kill -9 of the driver and
    its Ray: no index (a new cache's is uploaded last), the units' shards and markers wait in the store. Either way
    the rerun (this process's Ray) runs no task for the units done and gives a one-process extract's rows."""
    url = f"s3://{bucket}/run/features.h5"
    args = [sys.executable, "-m", "catdog_cache", "extract", str(photos), "--cache", url, *TINY, *RAY,
            "--shard-size", "1", "--batch-size", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**env(), "CATDOG_BATCH_DELAY": "1", "CATDOG_STORE_LEASE_SECONDS": "1"})
    try:
        deadline = time.monotonic() + 120
        while sum(".done/" in o for o in objects(bucket, "run/")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the driver and its Ray
            out, err = proc.communicate(timeout=120)
    finally:
        kill_all(proc)  # kill -9: the driver, then its Ray; else leftovers only
    done = sum(".done/" in o for o in objects(bucket, "run/"))
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and f"saved to {url}; run extract again to resume" in err, err[-2000:]
        assert "\x1b" not in out + err, (out + err)[-2000:]
        info = json.loads(cli("info", url, "--json").output)
        # the index lists every unit whose marker is in the store, and may list one more per actor: a unit whose
        # shard was taken in while its marker was still on its way up (the rerun redoes it; its rows are superseded)
        assert done <= info["rows"] <= done + 2 and info["incomplete"] == [str(photos.resolve())], info
    else:
        assert "run/features.h5" not in objects(bucket, "run/")
        time.sleep(1.5)  # the dead driver's lease expires (1 s here): the rerun takes it over
    again = cli("extract", photos, "--cache", url, *RAY, "--shard-size", "1").output
    assert f"ray: {6 - done} of 6 input shards of 1 file run on 2 actors" in again, again
    cli("extract", photos, "--cache", tmp_path / "one.h5", *TINY, "--workers", "0")
    assert_same_rows(url, tmp_path / "one.h5")
    assert json.loads(cli("info", url, "--json").output)["incomplete"] == []


def test_a_worker_killed_midway_is_retried_into_the_bucket(cli, ray, tmp_path: Path, photos: Path, bucket: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit 1's first attempt is SIGKILLed after a batch, unit 2's between its shard (still in the worker's folder)
    and its marker: Ray restarts the actor (which clears the dead one's folder) and runs the unit again; the store
    gets every row once, a one-process extract's rows."""
    flags = [tmp_path / "killed-1", tmp_path / "killed-2"]
    monkeypatch.setenv("CATDOG_RAY_KILL", f"1:batch:{flags[0]},2:marker:{flags[1]}")
    url = f"s3://{bucket}/run/features.h5"
    r = cli("extract", photos, "--cache", url, *TINY, *RAY, "--shard-size", "2")
    assert all(f.exists() for f in flags) and "ray: 3 of 3 input shards" in r.output, r.output
    assert sum(".shards/" in o for o in objects(bucket, "run/")) == 3  # the killed attempts uploaded nothing
    assert not [p for p in ray.rglob("*") if p.is_file()]  # no worker folder keeps a shard
    cli("extract", photos, "--cache", tmp_path / "one.h5", *TINY, "--workers", "0")
    assert_same_rows(url, tmp_path / "one.h5")
