"""`compact` of a cache in an S3 bucket (moto's server): compacted in the staging copy under the writer's lease, the
merged shard uploaded, then the index, then the superseded shards removed; the rows and features read the same,
bit for bit, and a compaction whose index upload fails leaves the old cache readable."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, draw, lines
from tests.store.test_store_s3 import rows_of

SMALL = ("--workers", "0", "--part-rows", "2", "--batch-size", "2")  # 6 photos -> 3 shards
pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")


def objects(bucket: str) -> dict[str, str]:
    """key -> ETag of every object in the bucket."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {p[len(bucket) + 1:]: str(info.get("ETag")) for p, info in fs.find(bucket, detail=True).items()}


def shards(stored: dict[str, str]) -> set[str]:
    return {k for k in stored if ".shards/" in k}


@pytest.fixture
def two_appends(cli, tmp_path: Path, photos: Path, bucket: str) -> str:
    """A store cache written by two extracts (3 shards, then 1 more): several shards."""
    url = f"s3://{bucket}/run/features.h5"
    cli("extract", photos, "--cache", url, *TINY, *SMALL)
    old = time.time_ns() - 60 * 10**9
    for i in range(2):  # two more photos: the second run appends a shard
        os.utime(draw(photos / f"cat.{10 + i}.jpg", "cat", 10 + i), ns=(old, old))
    r = cli("extract", photos, "--cache", url, *SMALL)
    assert "extracted 2 new, reused 6" in r.output, r.output
    assert len(shards(objects(bucket))) == 4  # the first run's 3, the new photos' 1
    return url


@pytest.mark.parametrize("single", [False, True])
def test_compact_a_store_cache(cli, photos: Path, bucket: str, two_appends: str, monkeypatch: pytest.MonkeyPatch,
                               single: bool) -> None:
    from catdog_cache.store import mirror

    url = two_appends
    before_rows = rows_of(url)
    before_info = json.loads(cli("info", url, "--json").output)
    stored = objects(bucket)
    old_shards = shards(stored)
    markers = {k: v for k, v in stored.items() if ".done/" in k}
    real = mirror.upload_file
    seen_at_index: list[dict[str, str]] = []

    def watch(fs, local: str, remote: str) -> None:  # type: ignore[no-untyped-def]
        if remote.endswith("run/features.h5"):  # what a reader finds just before the new index lands
            seen_at_index.append(objects(bucket))
        real(fs, local, remote)

    monkeypatch.setattr(mirror, "upload_file", watch)
    r = cli("compact", url, *(["--single"] if single else []))
    assert f"compacted {url}: {len(old_shards)} shards -> {'one file' if single else '1 shard'}" in r.output, r.output

    # the old index and every shard it lists were all in the store until the new index replaced it
    [at_index] = seen_at_index
    assert old_shards <= set(at_index) and at_index["run/features.h5"] == stored["run/features.h5"]
    if not single:  # the merged shard the new index lists was uploaded before it
        assert len(shards(at_index) - old_shards) == 1
    after = objects(bucket)
    assert len(shards(after)) == (0 if single else 1) and not shards(after) & old_shards  # superseded: removed
    assert {k: v for k, v in after.items() if ".done/" in k} == markers  # the markers stay, unchanged
    assert not any(k.endswith(".lease") for k in after)

    after_info = json.loads(cli("info", url, "--json").output)
    assert after_info["rows"] == before_info["rows"] == 8 and after_info["classes"] == before_info["classes"]
    assert [after_info[k] for k in ("views", "dim")] == [before_info[k] for k in ("views", "dim")]
    assert rows_of(url) == before_rows  # bitwise: every row's label and features
    again = cli("extract", photos, "--cache", url, "--workers", "0")
    assert "extracted 0 new, reused 8" in again.output, again.output
    assert objects(bucket) == after  # the rerun uploaded and removed nothing


def test_a_compact_whose_index_upload_fails_leaves_the_old_cache(cli, bucket: str, two_appends: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from catdog_cache.store import mirror

    url = two_appends
    before_rows = rows_of(url)
    stored = objects(bucket)
    real = mirror.upload_file

    def cut(fs, local: str, remote: str) -> None:  # type: ignore[no-untyped-def]
        if remote.endswith("run/features.h5"):
            raise ConnectionError("connection reset by peer")  # the PUT never completed: S3 stores nothing
        real(fs, local, remote)

    monkeypatch.setattr(mirror, "upload_file", cut)
    r = cli("compact", url, ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert "cannot write to" in r.output and "run compact again" in r.output, r.output
    after = objects(bucket)
    assert {k: v for k, v in after.items() if k in stored} == stored  # the old index and all its shards, unchanged
    assert len(shards(after) - shards(stored)) == 1  # the merged shard, listed by no index
    assert rows_of(url) == before_rows
    monkeypatch.setattr(mirror, "upload_file", real)

    r = cli("compact", url)  # the rerun pulls the store as it is: the old index, the unlisted merged shard adopted
    assert "compacted" in r.output, r.output
    assert len(shards(objects(bucket))) == 1 and rows_of(url) == before_rows
