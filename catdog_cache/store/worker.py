"""A Ray worker's side of a cache on object storage: the units it runs write their shards and markers into a local
folder of its own (in its node's user cache folder, never a folder another node would need to see), and after each
unit it uploads them straight to the store, shards first, then markers (a marker in the store names shards that are
there), and removes its local files. The driver never relays a shard; it takes them in from the store to write the
index (staging.Stage.collect), which it alone uploads, last.

What a killed worker leaves: locally, at most the unit it was running (removed by the next worker of that node for
the same store); in the store, shards without their marker (the unit is redone, its rows superseded by the redo's),
never a marker without its shards."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

from .mirror import Mirror
from .url import StoreURL, local_copy_path, store_fs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerStore:
    """One worker process's local folder for a store cache (`cache`: the index path units write beside) and its
    uploads."""

    def __init__(self, loc: StoreURL) -> None:
        self.loc = loc
        base = local_copy_path(loc, "work").parent
        host = socket.gethostname()
        self._clear_dead(base, host)
        folder = base / f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        self.cache = folder / loc.name
        self._mirror: Mirror | None = None

    @staticmethod
    def _clear_dead(base: Path, host: str) -> None:
        """Folders of this node's workers that died before uploading (their unit is redone)."""
        if not base.is_dir():
            return
        for folder in base.iterdir():
            parts = folder.name.rsplit("-", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])) \
                    and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)

    @property
    def mirror(self) -> Mirror:
        if self._mirror is None:  # the file system is made in the worker, from its own environment (credentials)
            fs, base = store_fs(self.loc)
            self._mirror = Mirror(fs, base, self.cache, self.loc.url)
        return self._mirror

    def upload(self) -> list[str]:
        """Every finished shard, then every marker, of this worker's folder to the store, each removed here once
        stored; returns the names uploaded. Raises StoreError (one line) on a failed upload: the unit is not done in
        the store (its marker was not uploaded), so the driver's next run redoes it."""
        files = self.mirror.local_files()
        order = [r for r in files if r.startswith(".shards/")] + [r for r in files if r.startswith(".done/")]
        for rel in order:
            self.mirror.push(rel)
            self.mirror.local_path(rel).unlink(missing_ok=True)
            self.mirror.manifest.pop(rel, None)
        return order
