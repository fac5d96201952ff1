"""A cache in an S3 bucket, against a real S3 API: moto's server on localhost (ThreadedMotoServer), read and written
through s3fs, the endpoint given as users give it (AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL), dummy credentials.
Extract (local engine) into the bucket, rerun, info and fit from it, nothing in the working folder, and an upload
cut short at a shard or at the index: the next run gives every row exactly once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, draw, lines

SMALL = ("--workers", "0", "--part-rows", "2", "--batch-size", "2")  # 6 photos -> 3 shards
pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")


def rows_of(cache: str | Path) -> dict[bytes, tuple[int, bytes]]:
    """path -> (label, the features' bytes), read by the project's one reader (a store cache: its local copy);
    a path twice would fail the length check below."""
    from catdog_cache.cache import open_cache
    from catdog_cache.cache.read import read_features
    from catdog_cache.store.staging import readable_cache

    with open_cache(readable_cache(cache)) as (view, idx):
        feats = read_features(view)
        out = {p: (int(label), np.ascontiguousarray(f).tobytes()) for p, label, f in zip(idx.paths, idx.labels, feats,
                                                                                          strict=True)}
        assert len(out) == len(idx.paths), "a path listed twice"
        return out


def objects(bucket: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return sorted(p[len(bucket) + 1:] for p in fs.find(bucket))


def test_extract_into_the_bucket_then_rerun_info_and_fit(cli, tmp_path: Path, photos: Path, bucket: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/run1/features.h5"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(os.listdir(work))
    r = cli("extract", photos, "--cache", url, *TINY, *SMALL)
    assert "extracted 6 new" in r.output and url in r.output, r.output
    assert sorted(os.listdir(work)) == before  # nothing in the working folder (the staging copy: user cache)
    stored = objects(bucket)
    assert "run1/features.h5" in stored and sum(o.startswith("run1/features.h5.shards/") for o in stored) == 3

    cli("extract", photos, "--cache", work / "local" / "features.h5", *TINY, *SMALL)
    assert rows_of(url) == rows_of(work / "local" / "features.h5")  # bitwise: same process, same batches

    again = cli("extract", photos, "--cache", url, "--workers", "0")
    assert "extracted 0 new, reused 6" in again.output, again.output
    assert objects(bucket) == stored  # nothing uploaded again, nothing removed

    info = json.loads(cli("info", url, "--json").output)
    assert info["cache"] == url and info["rows"] == 6 and info["classes"] == {"cat": 3, "dog": 3}
    fit = cli("fit", "--cache", url, "--head", work / "out" / "head.pt", "--epochs", "2", "-q")
    assert (work / "out" / "head.pt").is_file(), fit.output
    refused = cli("fit", "--cache", url, ok=False)
    assert refused.exit_code == 1 and "give --head PATH" in refused.output and len(lines(refused.output)) == 1
    assert sorted(os.listdir(work)) == sorted([*before, "local", "out"])


def test_a_changed_object_is_read_again(cli, tmp_path: Path, photos: Path, bucket: str) -> None:
    """The read copy is checked against the store's size and ETag on every read: another writer's new index (more
    rows) is downloaded, not the copy from before."""
    url = f"s3://{bucket}/r/features.h5"
    cli("extract", photos, "--cache", url, *TINY, "--workers", "0")
    assert json.loads(cli("info", url, "--json").output)["rows"] == 6
    os.utime(draw(photos / "cat.9.jpg", "cat", 9), ns=(time.time_ns() - 60 * 10**9,) * 2)
    cli("extract", photos, "--cache", url, "--workers", "0")
    assert json.loads(cli("info", url, "--json").output)["rows"] == 7


@pytest.mark.parametrize("cut_at", ["shard", "index"])
def test_an_upload_cut_short_gives_every_row_once(cli, tmp_path: Path, photos: Path, bucket: str,
                                                 monkeypatch: pytest.MonkeyPatch, cut_at: str) -> None:
    """The second shard's upload (or the index's) fails midway: the run fails in one line, the store keeps no index
    that lists a missing shard; the next run gives every row exactly once, the rows of a local extract."""
    from catdog_cache.store import mirror

    url = f"s3://{bucket}/run/features.h5"
    real = mirror.upload_file
    calls: list[str] = []

    def cut(fs, local: str, remote: str) -> None:  # type: ignore[no-untyped-def]
        calls.append(remote)
        shard = remote.endswith(".h5") and ".shards/" in remote
        if (cut_at == "shard" and shard and sum(".shards/" in c for c in calls) == 2) or \
                (cut_at == "index" and remote.endswith("run/features.h5")):
            raise ConnectionError("connection reset by peer")  # the PUT never completed: S3 stores nothing
        real(fs, local, remote)

    monkeypatch.setattr(mirror, "upload_file", cut)
    r = cli("extract", photos, "--cache", url, *TINY, *SMALL,
            ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert "cannot write to" in r.output and "run extract again" in r.output, r.output
    stored = objects(bucket)
    assert "run/features.h5" not in stored  # no index: readers see no cache, never a half one
    assert sum(".shards/" in o for o in stored) == (1 if cut_at == "shard" else 3), stored
    monkeypatch.setattr(mirror, "upload_file", real)

    again = cli("extract", photos, "--cache", url, *SMALL)
    assert "failed 0" in again.output, again.output
    cli("extract", photos, "--cache", tmp_path / "local.h5", *TINY, *SMALL)
    assert rows_of(url) == rows_of(tmp_path / "local.h5")
    assert "extracted 0 new, reused 6" in cli("extract", photos, "--cache", url, "--workers", "0").output
