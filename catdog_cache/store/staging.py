"""A cache on object storage, as the commands use it: `staged` (a writer: the store pulled into a local staging copy,
the run writes there, each finished shard and marker uploaded while the run goes on, the index uploaded last) and
`read_copy` (a reader: a local copy validated against the store). Both live in the user cache folder, never in the
working directory.

The order of a writer's uploads keeps the store a state a local run could have left: a marker only after its
unit's shards (markers are listed before shards, so a marker seen was written after the shards it names), the index
after every shard it lists, and objects it stops listing removed only after it. An upload cut short leaves the old
index; the next run pulls the store as it is (files never stored are dropped) and redoes what is missing, so every
row is there exactly once.

With `--engine ray` the workers write the shards: each uploads its own, then its markers, straight to the store
(store/worker.py); the driver's staging copy takes them in from the store (`Stage.collect`) before it writes the index
from them, and uploads that last, as above. Under torchrun (one node) every rank writes into the one staging copy
and rank 0 stages and uploads it (`staged_ranks`). `compact` compacts the staging copy: the merged shard is uploaded,
then the index, then the superseded shards are removed."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheBusy, CacheError, CatdogError, InputError
from ..files import printable, short
from .lease import take_lease
from .mirror import Mirror, StoreError
from .url import BadCache, CacheLocation, StoreURL, check_location, local_copy_path, store_fs

POLL_SECONDS = 0.2  # between the uploader's looks at the staging folder
AGAIN = {"extract": " (it extracts what the store lacks)", "compact": " (the store's cache reads as before it)"}


@contextlib.contextmanager
def _folder_lock(folder: Path, url: str, wait: bool) -> Iterator[None]:
    """One process at a time in a local copy's folder (a POSIX lock: it dies with its process). Writers are refused
    at once; readers wait for one another (each only pulls)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".session.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise CacheBusy(f"{short(printable(url))} is being written by another extract on this machine "
                                f"(staged in {folder}); wait for it to finish") from None
            raise
        yield
    finally:
        os.close(fd)


class Uploader:
    """A thread that uploads each finished shard, then each marker, of the staging copy while the run writes it."""

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="catdog-store-upload", daemon=True)

    def start(self) -> Uploader:
        self.thread.start()
        return self

    def sweep(self) -> None:
        """Everything finished now, markers listed first: the shards their units wrote are all in the later list."""
        done = [rel for rel in self.mirror.local_files() if rel.startswith(".done/")]
        shards = [rel for rel in self.mirror.local_files() if rel.startswith(".shards/")]
        for rel in shards + done:
            self.mirror.push(rel)

    def _run(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self.sweep()
            except BaseException as e:  # kept for the run's end: nothing more is uploaded, the index never
                self.error = e
                return

    def finish(self) -> None:
        """Stop the thread; the last sweep. Raises the first upload failure. Called again: one more sweep."""
        self.stopping.set()
        self.thread.join()
        if self.error is None:
            try:
                self.sweep()
            except BaseException as e:
                self.error = e
        self.mirror.save_manifest()
        if self.error is not None:
            raise self.error


@dataclass
class Stage:
    """A writer's staging copy in use: the store, the local copy, what uploads the copy's new files."""

    loc: StoreURL
    local: Path
    mirror: Mirror
    uploader: Uploader
    foreign: bool = False  # workers elsewhere may have uploaded objects this copy lacks (taken in by collect)

    def share(self) -> StoreURL:
        """The store for workers that upload their own shards and markers (store/worker.py)."""
        self.foreign = True
        return self.loc

    def collect(self) -> None:
        """After the workers: their shards and markers, from the store into the local copy (the index is written
        from them), once this copy's own uploads are done. Raises StoreError as one line."""
        self.uploader.finish()
        self.mirror.pull()
        self.foreign = False


_ACTIVE: dict[Path, Stage] = {}  # the staging copies this process writes now, by their index's path


def stage_of(cache: Path) -> Stage | None:
    """The staging copy whose index is `cache`, while `staged` holds it; None for any other path (a local cache)."""
    return _ACTIVE.get(Path(os.path.abspath(cache)))


@contextlib.contextmanager
def staged(loc: StoreURL, command: str = "extract") -> Iterator[Path]:
    """The local staging copy of a store cache for one writer: pulled on entry, pushed shard by shard while the
    caller writes it, the index last on exit (also when the run stops early: what it saved is a consistent cache).
    An upload that fails stops the uploads (the store keeps its old index) and is raised as one line."""
    fs, base = store_fs(loc)
    local = local_copy_path(loc, "stage")
    with _folder_lock(local.parent, loc.url, wait=False):
        lease = take_lease(fs, base + ".lease", loc.url, loc.protocol)  # one writer per store cache
        try:
            mirror = Mirror(fs, base, local, loc.url, lease.check if lease else None)
            mirror.pull()
            uploader = Uploader(mirror).start()
            stage = _ACTIVE[Path(os.path.abspath(local))] = Stage(loc, local, mirror, uploader)
            try:
                yield local
            except CatdogError as e:  # a message naming the staging copy names the cache as the user gave it
                if str(local) not in str(e):
                    raise
                raise type(e)(str(e).replace(str(local), short(printable(loc.url)))) from None
            finally:
                _ACTIVE.pop(Path(os.path.abspath(local)), None)
                try:
                    uploader.finish()
                    if lease:
                        lease.renew()  # still ours, for another lease period: the index is written under it
                    # the index: one object, after every shard it lists; then the objects it no longer lists, unless
                    # workers uploaded objects this copy has not taken in (they are not extras: the next run adopts)
                    if mirror.push("") and not stage.foreign:
                        mirror.remove_extras()
                    mirror.save_manifest()
                except StoreError as e:
                    again = AGAIN.get(command, "")
                    raise StoreError(f"{e}; the store keeps its earlier index: run {command} again{again}") from None
        finally:
            if lease:
                lease.give_back()


def read_copy(loc: StoreURL, source: str = "INPUT") -> Path:
    """A local copy of a store cache for readers (info, fit, predict, preview): the index and shards downloaded
    once, validated by size and ETag/modification time on every call and downloaded again only where the store's
    object changed. `source`: the input the refusal of a missing cache tells the user to extract."""
    fs, base = store_fs(loc)
    local = local_copy_path(loc, "read")
    with _folder_lock(local.parent, loc.url, wait=True):
        Mirror(fs, base, local, loc.url).pull()
    if not local.is_file():
        raise CacheError(f"no cache at {short(printable(loc.url))}: run `catdog-cache extract {source} --cache "
                         f"{short(printable(loc.url))}` first")
    return local


def readable_cache(value: CacheLocation | BadCache | str | os.PathLike[str]) -> Path:
    """--cache for a command that reads a cache: a local path as it is, a store URL as its read-through copy."""
    loc = check_location(value)
    return read_copy(loc) if isinstance(loc, StoreURL) else loc


@contextlib.contextmanager
def staged_ranks(loc: StoreURL, command: str, device: str) -> Iterator[Path]:
    """`staged` for torchrun's ranks on one node: they all write their shards into the one staging copy (its folder
    is a digest of the URL, so every rank names the same one). Rank 0 takes the lease and pulls the store before
    any rank plans from the copy; its uploader sends every rank's finished shards; after extraction, where rank 0
    has listed every rank's shards in the index (the ranks meet before it), rank 0 uploads the index last. Ranks on
    other nodes, or that disagree on the folder ($XDG_CACHE_HOME), are refused in one line on every rank."""
    import socket

    from ..engines.torchrun import from_env

    dist = from_env(device)
    assert dist is not None  # WORLD_SIZE > 1: the caller checked
    local = local_copy_path(loc, "stage")
    seen = dist.gather((socket.gethostname(), str(local)))
    if len(set(seen)) > 1:
        hosts = len({h for h, _ in seen})
        why = f"its ranks run on {hosts} nodes" if hosts > 1 else "its ranks stage in different folders " \
            "($XDG_CACHE_HOME differs)"
        raise InputError(f"{command} --cache {short(printable(loc.url))}: torchrun writes into object storage from "
                         f"one node, its ranks sharing one staging copy; {why}: run on one node, or use --engine ray")
    error: CatdogError | None = None
    with contextlib.ExitStack() as stack:
        if dist.main:
            try:
                stack.enter_context(staged(loc, command))
            except CatdogError as e:
                error = e
        message = dist.gather(str(error) if error else "")[0]  # the store is pulled before any rank goes on
        if message:
            raise error if error else CacheBusy(message)
        yield local


@contextlib.contextmanager
def writable_cache(value: CacheLocation | BadCache | str | os.PathLike[str], command: str = "extract",
                   engine: str = "local", device: str = "auto") -> Iterator[Path]:
    """--cache for a writer: a local path as it is; a store URL staged (`staged`; under --engine ray the workers
    upload their shards themselves; under torchrun `staged_ranks`, whose process group joins on `device`)."""
    loc = check_location(value)
    if not isinstance(loc, StoreURL):
        yield loc
        return
    if engine not in ("local", "ray"):
        raise InputError(f"{command} --cache {short(printable(loc.url))}: --engine {engine} cannot write into "
                         "object storage; the local engine (one process or torchrun on one node) and --engine ray do")
    if engine == "local" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        with staged_ranks(loc, command, device) as local:
            yield local
        return
    with staged(loc, command) as local:
        yield local
