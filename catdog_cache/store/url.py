"""What `--cache` names, decided in one place: a local path or an object-store URL (`s3://`, `gs://`, `memory://`,
any fsspec protocol). `file://` is a local path; a one-letter scheme (`C://`, `C:\\`) is a Windows drive, never a
URL; `s3:/bucket/x.h5` (a URL that lost a slash, as `pathlib.Path("s3://...")` spells it) is refused rather than
written as a local folder named `s3:`. Also here: the fsspec file system for a URL (a missing backend is one line
naming the extra) and the user cache folder where a store's caches are staged and read."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError
from ..files import printable, short, url_fs

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://(.*)$", re.S)  # two letters at least: C:// is a drive
_LOST_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
# Schemes refused in the one-slash spelling even without fsspec installed to list its own.
_KNOWN = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "http", "https", "memory", "hf", "oci", "oss",
          "r2", "webdav", "sftp", "ftp", "hdfs", "file", "local"}
# Who reads and writes a cache on object storage (the refusal of the others names them); "" while none does.
STORE_COMMANDS = "extract (local engine or --engine ray), compact, info, fit, predict and preview"


@dataclass(frozen=True)
class StoreURL:
    """A cache on object storage: `url` as given (the index object), `protocol` lower-cased."""

    url: str
    protocol: str

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        """The index object's own name (features.h5): the local copy keeps it."""
        return PurePosixPath(self.url.split("://", 1)[1].rstrip("/")).name or "features.h5"

    def beside(self, suffix: str) -> str:
        """`<cache><suffix>`: the shards (.shards), done markers (.done) and lease (.lease) live beside the index."""
        return self.url + suffix


CacheLocation = Path | StoreURL


def _protocols() -> set[str]:
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        return _KNOWN
    return _KNOWN | set(known_implementations)


def cache_location(value: str | os.PathLike[str] | StoreURL) -> CacheLocation:
    """`--cache`'s one parser (typer calls it for every command's --cache; the library's entries for a string).
    Raises InputError for a URL spelled with one slash."""
    if isinstance(value, StoreURL):
        return value
    text = os.fspath(value)
    if not isinstance(value, os.PathLike):  # a Path has lost `//` already: only its first part can be checked
        m = _URL.match(text)
        if m and m[1].lower() in ("file", "local"):
            return Path(m[2])
        if m:
            if not m[2].strip("/"):
                raise InputError(f"--cache {short(printable(text))}: name the cache object, e.g. "
                                 f"{m[1]}://bucket/run1/features.h5")
            return StoreURL(text, m[1].lower())
        if text.startswith(("./", "/", "~")):  # spelled as a path on purpose
            return Path(text)
    lost = _LOST_SLASH.match(text)
    if lost and lost[1].lower() in _protocols():
        raise InputError(f"--cache {short(printable(text))}: a URL needs two slashes ({lost[1]}://...); for a local "
                         f"folder named '{lost[1]}:', write ./{short(printable(text))}")
    return Path(text)


def cache_arg(value: str | os.PathLike[str] | StoreURL) -> Any:
    """typer's parser for --cache. It cannot raise InputError (click would print a usage error with a traceback's
    words): a one-slash URL comes back as the text itself, and `local_cache`/`cache_location` refuse it in the
    command, in the project's one line."""
    try:
        return cache_location(value)
    except InputError:
        return BadCache(os.fspath(value))  # type: ignore[arg-type]


@dataclass(frozen=True)
class BadCache:
    """A --cache value the parser refused; the command says why (its one line) before doing anything."""

    text: str


def check_location(value: CacheLocation | BadCache | str | os.PathLike[str]) -> CacheLocation:
    """The parsed value, or the parser's refusal raised (InputError) where the command can print it."""
    return cache_location(value.text if isinstance(value, BadCache) else value)


def local_cache(value: CacheLocation | BadCache | str | os.PathLike[str], command: str, why: str = "") -> Path:
    """For a command (or an engine) that needs --cache on a local disk: the path, or one line saying why (`why`)
    and what works."""
    loc = check_location(value)
    if isinstance(loc, StoreURL):
        works = f"works with {STORE_COMMANDS} (a local copy is read)" if STORE_COMMANDS else "is not supported yet"
        why = f" ({why})" if why else ""
        raise InputError(f"{command} --cache {short(printable(loc.url))}: {command} needs a cache on a local disk"
                         f"{why}; "
                         f"a cache on object storage ({loc.protocol}://) {works}: give a local path")
    return loc


def store_fs(loc: StoreURL) -> tuple[Any, str]:
    """(fsspec file system, path in it) for a store URL; a missing fsspec or backend is one line naming the extra."""
    return url_fs(loc.url, f"--cache {short(printable(loc.url))}", "a cache on object storage")


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/catdog-cache (else ~/.cache/catdog-cache): never the working directory."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "catdog-cache"


def local_copy_path(loc: StoreURL, kind: str) -> Path:
    """Where a store cache is staged (kind "stage": a writer's) or read (kind "read": readers'), one folder per URL:
    `<user cache>/store/<kind>/<digest of the URL>/<the index's name>`."""
    digest = hashlib.sha256(loc.url.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", loc.name).lstrip(".") or "features.h5"
    return user_cache_dir() / "store" / kind / digest / name
