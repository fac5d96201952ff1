"""One writer at a time on a store cache, without flock: the lease object taken with S3's conditional PUT
(If-None-Match: *), renewed with If-Match, taken over once expired; against moto's S3 server, which honours both."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from catdog_cache.errors import CacheBusy
from catdog_cache.store.lease import Lease
from catdog_cache.store.mirror import StoreError
from tests.conftest import TINY, lines

pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")


def _fs():  # type: ignore[no-untyped-def]
    import s3fs

    return s3fs.S3FileSystem()


def test_a_second_writer_is_refused_naming_the_holder(cli, photos: Path, bucket: str) -> None:
    url = f"s3://{bucket}/run/features.h5"
    other = Lease(_fs(), f"{bucket}/run/features.h5.lease", url)
    other.holder = "node-7 pid 4242"  # another machine's run
    other.take()
    try:
        r = cli("extract", photos, "--cache", url, *TINY, "--workers", "0", ok=False)
        assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
        assert "is being written by node-7 pid 4242" in r.output and f"{url}.lease" in r.output, r.output
        assert not _fs().exists(f"{bucket}/run/features.h5.shards")  # it wrote nothing
    finally:
        other.give_back()
    assert not _fs().exists(f"{bucket}/run/features.h5.lease")
    cli("extract", photos, "--cache", url, *TINY, "--workers", "0")
    assert not _fs().exists(f"{bucket}/run/features.h5.lease")  # given back at the end of the run


def test_an_expired_lease_is_taken_over(cli, photos: Path, bucket: str) -> None:
    """A run killed -9 leaves its lease; once it has expired, the next run takes it over and finishes."""
    _fs().pipe_file(f"{bucket}/run/features.h5.lease",
                    json.dumps({"holder": "dead-node pid 1", "run": "x", "expires": time.time() - 1}).encode())
    r = cli("extract", photos, "--cache", f"s3://{bucket}/run/features.h5", *TINY, "--workers", "0")
    assert "extracted 6 new" in r.output, r.output


def test_of_two_runs_taking_over_an_expired_lease_one_wins(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATDOG_STORE_LEASE_SECONDS", "1")
    path, url = f"{bucket}/c.h5.lease", f"s3://{bucket}/c.h5"
    dead = Lease(_fs(), path, url)
    dead.take()
    dead._stop.set()  # it stops renewing, as a killed run does
    time.sleep(1.3)
    first, second = Lease(_fs(), path, url), Lease(_fs(), path, url)
    first.holder = "first pid 1"
    first.take()
    try:
        with pytest.raises(CacheBusy, match="being written by first pid 1"):
            second.take()
        with pytest.raises(StoreError, match="lost the lease"):
            dead.renew()  # the stalled holder learns it lost the lease before it writes its index
    finally:
        first.give_back()
        second.give_back()


def test_the_renewal_keeps_a_live_run_s_lease(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATDOG_STORE_LEASE_SECONDS", "1")
    path, url = f"{bucket}/c.h5.lease", f"s3://{bucket}/c.h5"
    live = Lease(_fs(), path, url)
    live.take()
    try:
        time.sleep(2.5)  # more than two lease periods: renewed every third of one
        with pytest.raises(CacheBusy):
            Lease(_fs(), path, url).take()
        live.check()
    finally:
        live.give_back()
