"""A local copy of a cache kept in step with its objects in a store. The cache's files are the index
(`features.h5`), its shards (`features.h5.shards/*.h5`) and its done markers (`features.h5.done/*.json`); in the store
they are objects of the same names beside the index URL. `pull` makes the local copy equal the store (each object
downloaded once, validated by size and ETag/modification time, again only if it changed; local files the store
lacks removed); `push` uploads a local file; the manifest records what each local file was in the store.

Why a whole local copy: every reader and writer of the cache (planning, the shard writer, the streamed reader that
keeps --max-memory) then works on local files, as for a local cache, and the store only ever receives finished
files, each in one PUT (an S3 object appears whole or not at all)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CatdogError
from ..files import printable, short, write_atomic

SUFFIXES = (".shards", ".done")  # the folders beside the index whose files are mirrored
MANIFEST = ".store-manifest.json"
VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified", "mtime", "updated",
                "created")


class StoreError(CatdogError):
    """The store refused or failed a read or a write (network, permissions, a missing bucket)."""


@dataclass(frozen=True)
class Remote:
    """An object as the store lists it: what says it is unchanged."""

    size: int
    version: str


def version_of(info: dict[str, Any]) -> str:
    return next((str(info[k]) for k in VERSION_KEYS if info.get(k) is not None), "")


class Mirror:
    """The local copy `local` (the index's path; shards and markers beside it) of the store's `base` on `fs`."""

    def __init__(self, fs: Any, base: str, local: Path, url: str, check: Callable[[], None] | None = None) -> None:
        self.fs, self.base, self.local, self.url = fs, base.rstrip("/"), local, url
        self.check = check  # raises when this writer may no longer write (its lease is lost)
        self.manifest_path = local.parent / MANIFEST
        self.manifest: dict[str, dict[str, Any]] = self._load_manifest()

    # -- names: rel "" is the index, ".shards/NAME.h5" a shard, ".done/NAME.json" a marker
    def remote_path(self, rel: str) -> str:
        return self.base + rel

    def local_path(self, rel: str) -> Path:
        return Path(str(self.local) + rel)

    def _load_manifest(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.manifest_path.read_bytes()[: 64 * 2**20])
        except (OSError, ValueError):
            return {}  # no or damaged manifest: every file is downloaded again
        return data if isinstance(data, dict) else {}

    def save_manifest(self) -> None:
        write_atomic(self.manifest_path, json.dumps(self.manifest).encode())

    def fail(self, what: str, e: BaseException) -> StoreError:
        reason = printable(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return StoreError(f"{what} {short(printable(self.url), 160)}: {short(reason, 200)}")

    # -- what is where
    def listing(self) -> dict[str, Remote]:
        """The store's objects of this cache: the index first (so every shard it lists, uploaded before it, is in
        the listing of the shards that follows), then shards and markers."""
        found: dict[str, Remote] = {}
        try:
            self.fs.invalidate_cache()  # s3fs keeps listings per process: another writer's objects must be seen
            try:
                info = self.fs.info(self.base)
                if info.get("type", "file") == "file":
                    found[""] = Remote(int(info.get("size") or 0), version_of(info))
            except FileNotFoundError:
                pass
            for suffix in SUFFIXES:
                folder = self.base + suffix
                try:
                    entries = self.fs.find(folder, detail=True)
                except FileNotFoundError:
                    continue
                for name, info in entries.items():
                    leaf = name[len(folder) + 1:] if name.startswith(folder + "/") else ""
                    if not leaf or "/" in leaf or leaf.startswith(".") or info.get("type", "file") != "file":
                        continue  # not a file of this cache (a nested key, a temp): never mirrored
                    found[f"{suffix}/{leaf}"] = Remote(int(info.get("size") or 0), version_of(info))
        except Exception as e:  # the backend's own errors too (botocore, aiohttp): one line
            raise self.fail("cannot list", e) from None
        return found

    def local_files(self) -> dict[str, os.stat_result]:
        """The local copy's files (regular, not temp files): rel -> stat."""
        out: dict[str, os.stat_result] = {}
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.local)
            if stat.S_ISREG(st.st_mode):
                out[""] = st
        for suffix in SUFFIXES:
            folder = self.local_path(suffix)
            if folder.is_symlink() or not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out[f"{suffix}/{entry.name}"] = entry.stat(follow_symlinks=False)
        return out

    def in_step(self, rel: str, st: os.stat_result | None, remote: Remote | None = None) -> bool:
        """Whether the local file is what the store holds (remote given) or what was last pushed (remote None)."""
        seen = self.manifest.get(rel)
        if st is None or not isinstance(seen, dict) or seen.get("size") != st.st_size or \
                seen.get("mtime_ns") != st.st_mtime_ns:
            return False
        return remote is None or (seen.get("version") == remote.version and remote.size == st.st_size)

    # -- moving files
    def pull(self) -> int:
        """Make the local copy equal the store; returns the bytes downloaded."""
        remote = self.listing()
        here = self.local_files()
        moved = 0
        for rel in sorted(set(here) - set(remote)):  # the store's state wins: a file never stored is not kept
            self.local_path(rel).unlink(missing_ok=True)
            self.manifest.pop(rel, None)
        for rel, obj in sorted(remote.items(), key=lambda kv: kv[0] == ""):  # the index last, as written
            if self.in_step(rel, here.get(rel), obj):
                continue
            moved += self._download(rel, obj)
        self.save_manifest()
        return moved

    def _download(self, rel: str, obj: Remote) -> int:
        target = self.local_path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.download")
        try:
            self.fs.get_file(self.remote_path(rel), str(tmp))
            size = os.lstat(tmp).st_size
            if size != obj.size:  # replaced while listed: the next pull takes the new one
                raise OSError(f"{rel or 'the index'} changed while it was read ({obj.size:,} bytes listed, "
                              f"{size:,} read): run again")
            os.replace(tmp, target)
        except Exception as e:  # the backend's own errors too (botocore, aiohttp): one line
            tmp.unlink(missing_ok=True)
            raise self.fail("cannot read", e) from None
        st = os.lstat(target)
        self.manifest[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": obj.version}
        return st.st_size

    def push(self, rel: str) -> bool:
        """Upload one local file (one PUT, or a multipart upload completed at once) unless the store already holds
        it; False when the file is gone (a shard a compact retired)."""
        try:
            st = os.lstat(self.local_path(rel))
        except FileNotFoundError:
            return False
        if self.in_step(rel, st):
            return True
        if self.check:
            self.check()
        try:
            upload_file(self.fs, str(self.local_path(rel)), self.remote_path(rel))
        except Exception as e:  # the backend's own errors too (botocore, aiohttp): one line
            raise self.fail("cannot write to", e) from None
        try:
            info = self.fs.info(self.remote_path(rel))
        except Exception as e:  # the backend's own errors too (botocore, aiohttp): one line
            raise self.fail("cannot check an upload to", e) from None
        self.manifest[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": version_of(info)}
        return True

    def remove_extras(self) -> None:
        """Objects of the cache the local copy no longer has (shards a compact retired, markers removed): after
        the index that stopped listing them is in the store."""
        here = self.local_files()
        extras = [rel for rel in self.listing() if rel and rel not in here]
        for rel in extras:
            try:
                self.fs.rm_file(self.remote_path(rel))
            except FileNotFoundError:
                pass
            except Exception as e:  # the backend's own errors too (botocore, aiohttp): one line
                raise self.fail("cannot remove an old object from", e) from None
            self.manifest.pop(rel, None)


def upload_file(fs: Any, local: str, remote: str) -> None:
    """One file to one object (a module function: tests cut an upload short here)."""
    fs.put_file(local, remote)
