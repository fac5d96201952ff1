"""One writer per cache."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import CacheBusy, CacheError
from ..files import stale_temps

_HELD: set[Path] = set()  # caches locked by this process (POSIX locks do not refuse their own process)
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One writer per cache: a second `extract` refuses at once.

    A POSIX record lock (fcntl): it belongs to this process only, so forked loader workers do not inherit it and
    it dies with the process (a flock would live on in workers that outlive a kill -9). The lock file is opened
    without following links and keyed by the resolved cache path (one cache, one lock, however it is spelled)."""
    import fcntl

    cache = cache.resolve()
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = cache.with_name(cache.name + ".lock")
    with _HELD_LOCK:
        if cache in _HELD:
            raise CacheBusy(f"{cache} is in use by another extract in this process")
        _HELD.add(cache)
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CacheError(f"{lock} is a symbolic link; refusing to follow it (remove it)") from None
            raise
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise CacheBusy(f"{cache} is in use by another extract (lock {lock}); wait for it to finish") \
                        from None
                raise CacheError(f"cannot lock {lock} ({e.strerror}); this file system has no locking: set "
                                 "HDF5_USE_FILE_LOCKING=FALSE and run one extract at a time") from None
            try:
                moved = os.fstat(fd).st_ino != os.lstat(lock).st_ino
            except FileNotFoundError:
                moved = True
            if moved:  # its holder removed it between our open and our lock
                raise CacheBusy(f"{cache} was in use by another extract a moment ago; run again")
            for stale in stale_temps(cache):  # a killed assembly's temp file holds space; we hold the lock
                stale.unlink(missing_ok=True)
            try:
                yield
            finally:  # removed while still held (so no lock file outlives its run); the inode check covers a racer
                with contextlib.suppress(OSError):
                    os.unlink(lock)
        finally:
            os.close(fd)
    finally:
        with _HELD_LOCK:
            _HELD.discard(cache)
