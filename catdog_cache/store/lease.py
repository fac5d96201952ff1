"""One writer at a time for a cache on object storage, without flock: a lease object `<cache>.lease` beside the index,
taken with the store's conditional write (S3: a PUT with `If-None-Match: *` creates it only if it is absent),
renewed while the run lives (a PUT with `If-Match: <its ETag>`: only its holder can), taken over once it has expired
(the same If-Match on the expired lease's ETag: of two runs taking it over, one wins), removed at the end.

A second writer is refused in one line naming the holder (host, process, until when). A holder that cannot renew
(another run took an expired lease over: this one was stalled past the lease) stops uploading before its index.
Expiry is judged by the clock of the run that reads the lease: clocks that differ by more than a few seconds
shorten or lengthen a dead run's lease by as much.

Stores without conditional writes (anything but S3 here): no lease is taken; one writer at a time is the user's
to keep (docs/scale.md)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..errors import CacheBusy
from ..files import printable, short
from .mirror import StoreError

LEASE_SECONDS = 60.0  # a run that stops renewing is taken over this long after its last renewal
CONDITIONAL = ("s3", "s3a")  # protocols whose backend here (s3fs) makes conditional PUTs


def lease_seconds() -> float:
    """LEASE_SECONDS, or $CATDOG_STORE_LEASE_SECONDS (tests: a lease that expires in a second)."""
    try:
        return max(1.0, float(os.environ.get("CATDOG_STORE_LEASE_SECONDS") or LEASE_SECONDS))
    except ValueError:
        return LEASE_SECONDS


class Lease:
    """The lease of one run on one cache URL; `take`, then `renew` (a thread does), `lost`, `give_back`."""

    def __init__(self, fs: Any, path: str, url: str) -> None:
        self.fs, self.path, self.url = fs, path, url
        self.seconds = lease_seconds()
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.run = uuid.uuid4().hex
        self.etag = ""
        self.lost: str = ""  # why this run no longer holds it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "run": self.run, "expires": time.time() + self.seconds}).encode()

    def _put(self, **condition: str) -> str:
        bucket, key, _ = self.fs.split_path(self.path)
        return str(self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **condition)["ETag"])

    def _read(self) -> tuple[dict[str, Any], str]:
        """The lease as stored and its ETag; ({}, "") when there is none (an unreadable one reads as expired)."""
        try:
            etag = str(self.fs.info(self.path, refresh=True).get("ETag") or "")
            data = json.loads(self.fs.cat_file(self.path)[:4096])
        except FileNotFoundError:
            return {}, ""
        except ValueError:
            return {"holder": "an unreadable lease", "expires": 0}, etag
        return (data if isinstance(data, dict) else {"expires": 0}), etag

    def take(self) -> None:
        """Take the lease or raise CacheBusy naming its holder."""
        for _ in range(3):
            try:
                self.etag = self._put(IfNoneMatch="*")
                return self._start()
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"cannot take the lease {short(printable(self.url))}.lease: {e}") from None
            current, etag = self._read()
            if not etag:
                continue  # given back between our PUT and our read: try again
            expires = float(current.get("expires") or 0) if isinstance(current.get("expires"), int | float) else 0
            if expires > time.time():
                until = time.strftime("%H:%M:%S", time.localtime(expires))
                who = printable(str(current.get("holder")))[:200]
                raise CacheBusy(f"{short(printable(self.url))} is being written by {who} (lease "
                                f"{short(printable(self.url))}.lease, held until {until} and renewed while that run "
                                "lives); wait for it to finish")
            try:  # expired: take it over, only if nobody else did since we read it
                self.etag = self._put(IfMatch=etag)
                return self._start()
            except OSError:
                continue  # another run took it over first: read who
        raise CacheBusy(f"{short(printable(self.url))}: its lease keeps changing hands; try again")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renewing, name="catdog-store-lease", daemon=True)
        self._thread.start()

    def _renewing(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except StoreError:
                return

    def renew(self) -> None:
        """Extend the lease (only its holder can: the PUT is conditional on the ETag it last wrote); raises
        StoreError once it is lost."""
        with self._lock:
            if self.lost:
                raise StoreError(self.lost)
            try:
                self.etag = self._put(IfMatch=self.etag)
            except OSError as e:
                self.lost = (f"lost the lease on {short(printable(self.url))} ({printable(str(e))[:120]}): another "
                             "run took it over after this one stalled; nothing more was uploaded")
                raise StoreError(self.lost) from None

    def check(self) -> None:
        if self.lost:
            raise StoreError(self.lost)

    def give_back(self) -> None:
        """Stop renewing; remove the lease if it is still ours (its ETag unchanged)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lost or not self.etag:
                return
            try:
                if str(self.fs.info(self.path, refresh=True).get("ETag") or "") == self.etag:
                    self.fs.rm_file(self.path)
            except OSError:
                pass  # it expires by itself


def take_lease(fs: Any, path: str, url: str, protocol: str) -> Lease | None:
    """The run's lease, or None where the store has no conditional write here."""
    if protocol not in CONDITIONAL:
        return None
    lease = Lease(fs, path, url)
    lease.take()
    return lease
