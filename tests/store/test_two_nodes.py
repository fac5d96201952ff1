"""Two Ray nodes on this machine, each started by `ray start` with a temp folder and a user cache folder
(XDG_CACHE_HOME) of its own, as two hosts of a cluster without a shared disk would have: `extract --engine ray
--ray-address <head>` from a third process (the driver, with its own user cache folder) writes into an S3 bucket
(moto's server). Each node's worker stages the shards it makes in its own node's folder and uploads them; the driver
takes them from the bucket, never from a node's folder: the rows equal a one-process extract's.

Opt-in (CATDOG_TWO_NODE_TEST=1): starting two Ray nodes takes most of a minute on a 2-vCPU machine. The nodes are
stopped by killing the processes this test started (never `ray stop`: it stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.engines.test_interrupts import env, kill_all
from tests.store.test_store_ray import assert_same_rows, objects

pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
RAY_CLI = shutil.which("ray", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
pytestmark = [
    pytest.mark.skipif(RAY_CLI is None, reason="the `ray` command is not installed (pip install 'catdog-cache[ray]')"),
    pytest.mark.skipif(os.environ.get("CATDOG_TWO_NODE_TEST") != "1",
                       reason="opt-in: CATDOG_TWO_NODE_TEST=1 runs it (two `ray start` nodes, about a minute)"),
]
STARTED = "Ray runtime started"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_started(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while STARTED not in (text := log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, f"ray start failed: {text[-2000:]}"
        time.sleep(0.3)
    return text


def _ours(root: str) -> list[int]:
    """Processes whose command line names this test's Ray temp folder (every Ray process of its nodes does)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if root.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    pids.append(int(name))
    return pids


@pytest.fixture
def cluster(endpoint: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A head and a worker node, each with 1 CPU (so the two actors land one on each), its own Ray temp folder and
    its own user cache folder; the S3 endpoint and this checkout's code reach their workers through the environment
    of `ray start` (a raylet's workers inherit it)."""
    root = tempfile.mkdtemp(prefix="cd2n-", dir="/tmp")  # short: Ray's socket paths live under it
    store = {"AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
             "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
             "RAY_AUTH_MODE": "disabled"}  # a test cluster on localhost: no token to hand between the nodes
    procs: list[subprocess.Popen] = []
    caches = {node: tmp_path / f"cache-{node}" for node in ("head", "worker", "driver")}

    def start(node: str, *args: str) -> tuple[subprocess.Popen, str]:
        log = Path(root) / f"{node}.log"
        caches[node].mkdir()
        with log.open("wb") as f:
            proc = subprocess.Popen([RAY_CLI, "start", "--block", "--num-cpus=1", f"--temp-dir={root}/{node}",
                                     "--disable-usage-stats", *args], stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    env={**env(), **store, "XDG_CACHE_HOME": str(caches[node])})
        procs.append(proc)
        return proc, _wait_started(proc, log)

    try:
        port = _free_port()
        _, said = start("head", "--head", f"--port={port}", "--include-dashboard=false")
        m = re.search(r"ray start --address='([^']+)'", said)
        address = m[1] if m else f"127.0.0.1:{port}"
        start("worker", f"--address={address}")
        caches["driver"].mkdir()
        yield {"address": address, "caches": caches,
               "env": {**env(), **store, "XDG_CACHE_HOME": str(caches["driver"])}}
    finally:
        for proc in procs:
            kill_all(proc)
        for pid in _ours(root):  # anything of the nodes' that left their sessions
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_two_nodes_write_into_the_bucket(cli, cluster, tmp_path: Path, photos: Path, bucket: str) -> None:
    url = f"s3://{bucket}/run/features.h5"
    work = tmp_path / "work"
    work.mkdir()
    args = [sys.executable, "-m", "catdog_cache", "extract", str(photos), "--cache", url, *TINY, "--engine", "ray",
            "--ray-address", str(cluster["address"]), "--actors", "2", "--workers", "0", "--batch-size", "2",
            "--shard-size", "2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=work, env=cluster["env"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "extracted 6 new" in r.stdout and "ray: 3 of 3 input shards of 2 files run on 2 actors" in r.stdout, \
        r.stdout
    stored = objects(bucket, "run/")
    assert sum(".shards/" in o for o in stored) == 3 and sum(".done/" in o for o in stored) == 3, stored
    assert os.listdir(work) == []  # nothing in the working folder

    caches: dict[str, Path] = cluster["caches"]  # type: ignore[assignment]
    for node in ("head", "worker"):  # each node's worker staged in its own node's folder, emptied by its uploads
        store = caches[node] / "catdog-cache" / "store"
        assert [p.name for p in store.iterdir()] == ["work"], node
        assert len(list((store / "work").glob("*/*"))) >= 1, f"no actor ran on the {node} node"
        assert not [p for p in store.rglob("*") if p.is_file()], node
    # the driver: its staging copy alone (the index written from shards it took from the bucket), no worker folder
    assert [p.name for p in (caches["driver"] / "catdog-cache" / "store").iterdir()] == ["stage"]

    cli("extract", photos, "--cache", tmp_path / "one.h5", *TINY, "--workers", "0")
    assert_same_rows(url, tmp_path / "one.h5")
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=work, env=cluster["env"])
    assert again.returncode == 0 and "no task ran" in again.stdout, (again.stdout + again.stderr)[-3000:]
    assert objects(bucket, "run/") == stored
