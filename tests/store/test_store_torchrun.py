"""torchrun into a cache in an S3 bucket (moto's server), two ranks on the CPU over Gloo: both write their shards
into the one staging copy on the node, rank 0 pulls the store first and uploads the index after every rank's
shards; the rows equal a one-process extract's and a rerun extracts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, class_folder

ARGS = [*TINY, "--quiet", "--part-rows", "4", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")


def torchrun(data: Path, url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "catdog_cache", "extract", str(data), "--cache", url, *ARGS]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def objects(bucket: str) -> dict[str, str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {p[len(bucket) + 1:]: str(info.get("ETag")) for p, info in fs.find(bucket, detail=True).items()}


def test_two_ranks_write_into_the_bucket(cli, tmp_path: Path, bucket: str, _user_cache: Path) -> None:
    """10 photos and a broken file (its failure record is a row a rerun reuses too: reused 11)."""
    from catdog_cache.cache import read_features, read_index
    from catdog_cache.store.staging import readable_cache

    data = class_folder(tmp_path / "data", 5)
    url = f"s3://{bucket}/tr/features.h5"
    r = torchrun(data, url)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("extracted") == 1 and url in r.stdout, r.stdout  # rank 0 speaks for all
    stored = objects(bucket)
    assert "tr/features.h5" in stored and not any(k.endswith(".lease") for k in stored), stored
    for rank in ("-r0000-", "-r0001-"):  # each rank's shards, uploaded by rank 0 from the one staging copy
        assert any(".shards/" in k and rank in k for k in stored), stored
    assert len(os.listdir(_user_cache / "catdog-cache" / "store" / "stage")) == 1  # one copy for both ranks

    cli("extract", data, "--cache", tmp_path / "one.h5", *ARGS)
    mine, ref = readable_cache(url), tmp_path / "one.h5"
    a, b = read_index(mine), read_index(ref)
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist() and a.shape[0] == 10
    assert [f[1:] for f in a.failed] == [f[1:] for f in b.failed] and len(a.failed) == 1
    np.testing.assert_allclose(read_features(mine), read_features(ref), atol=1e-5)  # other batches: not bitwise

    again = torchrun(data, url)  # the staging copy is pulled by rank 0 and read by both ranks
    assert again.returncode == 0, again.stderr[-3000:]
    assert "extracted 0 new, reused 11" in again.stdout.replace("\n", " "), again.stdout
    assert objects(bucket) == stored  # nothing uploaded again, nothing removed


class FakeDist:
    """A rank whose collectives answer what the other ranks would have sent (no process group)."""

    def __init__(self, rank: int, answers: list[list[object]]) -> None:
        self.rank, self.main, self.answers = rank, rank == 0, answers

    def gather(self, obj: object) -> list[object]:
        return self.answers.pop(0)


def test_ranks_on_several_nodes_or_a_refusal_of_rank_0_stop_every_rank(monkeypatch: pytest.MonkeyPatch,
                                                                       _user_cache: Path) -> None:
    """Ranks on two nodes would stage in two copies, so the second node's shards would never be uploaded: refused
    in one line before anything is staged; rank 0's refusal (a busy lease) reaches a rank that waits for it."""
    from catdog_cache.engines import torchrun as tr
    from catdog_cache.errors import CacheBusy, InputError
    from catdog_cache.store.staging import writable_cache
    from catdog_cache.store.url import StoreURL, local_copy_path

    url = "memory://bucket/tr/features.h5"
    here = str(local_copy_path(StoreURL(url, "memory"), "stage"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tr, "from_env", lambda device: FakeDist(0, [[("node-a", here), ("node-b", here)]]))
    with pytest.raises(InputError, match=r"its ranks run on 2 nodes: run on one node, or use --engine ray"), \
            writable_cache(url):
        pass
    assert not (_user_cache / "catdog-cache" / "store" / "stage").exists()  # nothing staged, no lease taken

    busy = "memory://bucket/tr/features.h5 is being written by another extract on this machine"
    monkeypatch.setattr(tr, "from_env", lambda device: FakeDist(1, [[("node-a", here)] * 2, [busy, ""]]))
    with pytest.raises(CacheBusy, match="being written by another extract"), writable_cache(url):
        pass
