"""torchrun: two ranks give the same cache as one process (on the CPU over Gloo, and with CUDA on however many GPUs
the machine has: one GPU is shared by both ranks); a killed rank's work resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from catdog_cache.cache import list_parts, parts_dir, read_features, read_index
from catdog_cache.engines.torchrun import Dist, placement
from tests.conftest import TINY, class_folder, jpeg

ARGS = [*TINY, "--quiet", "--part-rows", "4", "--batch-size", "2", "--workers", "0"]


def torchrun(data, cache, env=None, device="auto", extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "catdog_cache", "extract", str(data), "--cache", str(cache), *ARGS, "--device", device, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def single(data, cache, device="auto"):
    return subprocess.run([sys.executable, "-m", "catdog_cache", "extract", str(data), "--cache", str(cache), *ARGS,
                           "--device", device], capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return class_folder(tmp_path_factory.mktemp("dist") / "data", 13)


def assert_same(a: Path, b: Path):
    ia, ib = read_index(a), read_index(b)
    assert ia.paths == ib.paths and ia.labels.tolist() == ib.labels.tolist() and ia.sources == ib.sources
    assert ia.provenance == ib.provenance and [f[1:] for f in ia.failed] == [f[1:] for f in ib.failed]
    np.testing.assert_allclose(read_features(a), read_features(b), atol=1e-5)


def test_shards_are_balanced_and_cover_everything():
    items = list(range(11))
    shards = [Dist(r, 3, r).share(items) for r in range(3)]
    assert sum(shards, []) == items and sorted(map(len, shards)) == [3, 4, 4]


def test_placement_shares_gpus_when_ranks_outnumber_them():
    assert placement("auto", 1, 2, 0) == ("gloo", None) and placement("cpu", 1, 2, 8) == ("gloo", None)
    assert placement("auto", 1, 2, 2) == ("nccl", 1) and placement("cuda", 3, 4, 8) == ("nccl", 3)
    # NCCL refuses two ranks on one GPU: they share it, and talk over Gloo
    assert placement("auto", 0, 2, 1) == ("gloo", 0) and placement("auto", 1, 2, 1) == ("gloo", 0)
    assert [placement("cuda", r, 3, 2) for r in range(3)] == [("gloo", 0), ("gloo", 1), ("gloo", 0)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_two_ranks_equal_one_process(data, tmp_path, device):
    """With CUDA, both ranks run on the GPU(s): NCCL with two GPUs, Gloo sharing one (placement)."""
    proc = torchrun(data, tmp_path / "two.h5", device=device)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().count("extracted") == 1  # rank 0 speaks for all
    single(data, tmp_path / "one.h5", device)
    assert_same(tmp_path / "one.h5", tmp_path / "two.h5")
    assert list_parts(tmp_path / "two.h5") == []  # rank 0 listed every rank's shards, copying none
    again = torchrun(data, tmp_path / "two.h5", device=device)  # ranks split the hashing of known files
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]
    assert "extracted 0 new, reused 27" in out.decode().replace("\n", " ")


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker torchrun started for `rank`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_killed_rank_leaves_parts_and_rerun_completes(data, tmp_path):
    cache = tmp_path / "c.h5"
    proc = torchrun(data, cache, {"CATDOG_BATCH_DELAY": "0.3"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(parts_dir(cache).glob("*-r0001-*.h5")):
        time.sleep(0.05)
    pid = rank_pid(proc.pid, 1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    finished = list(parts_dir(cache).glob("*.h5"))
    assert finished  # the work done before the kill is kept
    rerun = torchrun(data, cache)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    assert "reused 0" not in out.decode()
    single(data, tmp_path / "ref.h5")
    assert_same(tmp_path / "ref.h5", cache)


def test_two_ranks_on_tar_shards_with_classes_equal_one_process(tmp_path):
    """Tar input under torchrun: whole shards per rank, --classes on every rank, rank 0 writes the index."""
    from tests.extract.test_tars import make_tar

    for s in range(3):
        members = []
        for i in range(3):
            members += [(f"s{s}/{i}.jpg", jpeg("cat" if i % 2 else "dog", 10 * s + i, tmp_path / "drawn")),
                        (f"s{s}/{i}.cls", str((s + i) % 3).encode())]
        make_tar(tmp_path / "shards" / f"t-{s}.tar", members)
    spec = str(tmp_path / "shards" / "t-{0..2}.tar")
    proc = torchrun(spec, tmp_path / "two.h5", extra=["--classes", "x,y,z"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    subprocess.run([sys.executable, "-m", "catdog_cache", "extract", spec, "--cache", str(tmp_path / "one.h5"), *ARGS,
                    "--classes", "x,y,z"], capture_output=True, text=True, check=True)
    assert_same(tmp_path / "one.h5", tmp_path / "two.h5")
    assert read_index(tmp_path / "two.h5").classes == ["x", "y", "z"] and read_index(tmp_path / "two.h5").shape[0] == 9
