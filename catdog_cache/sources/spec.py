"""Tar-shard input (WebDataset): what `extract INPUT` names when INPUT is not a folder. One `.tar`, a brace pattern
(`shards/train-{000000..000099}.tar`, `{a,b}`), or a text file listing shards (one per line, `#` comments); each a
local path or an fsspec URL (`s3://`, `gs://`, `https://`, `memory://`; `file://` reads as a local path). Here:
naming the shards, their identity (size + version: what a done marker records), and a stream to read each one."""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import CatdogError, InputError
from ..files import plural, printable, read_regular, short, url_fs

MAX_SHARDS = 100_000  # per input: a pattern or listing naming more is refused before anything is expanded or read
MAX_LISTING_BYTES = 16 * 2**20  # a listing file of 100,000 URLs is ~10 MB
MAX_RANGE_DIGITS = 18  # a {lo..hi} bound longer than this is refused (int() raises past 4,300 digits)
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?[0-9]+)\.\.(-?[0-9]+)$")  # ASCII digits only, as the shell's ranges
_COMMENT = re.compile(r"\s#.*")  # a listing line's trailing comment


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def is_tar_input(spec: str | os.PathLike[str]) -> bool:
    """Whether `extract` should read `spec` as tar shards (a URL, a pattern, a tar, a listing) rather than a folder."""
    text = os.fspath(spec)
    if is_url(text) and not text.startswith("file://"):
        return True
    st = _stat(_local(text))
    if st is not None and stat.S_ISDIR(st.st_mode):
        return False
    if is_url(text):
        return True
    return bool(st and stat.S_ISREG(st.st_mode)) or "{" in text or text.lower().endswith(TAR_SUFFIXES)


def _stat(path: str) -> os.stat_result | None:
    """os.stat, or None where there is nothing to stat (missing, a name too long: a brace pattern's, say)."""
    try:
        return os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return None


def _group_values(body: str, where: str) -> list[str] | tuple[int, int, int]:
    """One brace group: a `{a,b}` list, or a `{lo..hi}` range as (lo, hi, width); zero-padded when a bound is."""
    m = _RANGE.match(body)
    if m:
        digits = max(len(m[1].lstrip("-")), len(m[2].lstrip("-")))
        if digits > MAX_RANGE_DIGITS:
            raise InputError(f"{where}: a brace range bound of {digits:,} digits; at most {MAX_RANGE_DIGITS}")
        lo, hi = int(m[1]), int(m[2])
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (m[1], m[2]))
        return lo, hi, max(len(m[1]), len(m[2])) if padded else 0
    if "," not in body:
        raise InputError(f"{where}: brace group {{{short(printable(body), 40)}}} is neither a list {{a,b}} nor a range "
                         "{000..099}")
    return body.split(",")


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """`train-{000..002}.tar` -> train-000.tar, train-001.tar, train-002.tar; several groups multiply. The count is
    known before anything is expanded: a pattern naming more than `limit` names is refused."""
    pieces = _BRACE.split(pattern)  # literal, group, literal, group, ..., literal
    groups = [_group_values(body, short(printable(pattern))) for body in pieces[1::2]]
    sizes = [abs(g[1] - g[0]) + 1 if isinstance(g, tuple) else len(g) for g in groups]
    if math.prod(sizes) > limit:
        raise InputError(f"{short(printable(pattern))} names {math.prod(sizes):,} shards; at most {limit:,} per "
                         "input: split it into several runs")

    def values(g: list[str] | tuple[int, int, int]) -> list[str]:
        if isinstance(g, list):
            return g
        lo, hi, width = g
        step = 1 if hi >= lo else -1
        return [f"{v:0{width}d}" for v in range(lo, hi + step, step)]

    out = []
    for combo in itertools.product(*(values(g) for g in groups)):
        out.append("".join(p for pair in itertools.zip_longest(pieces[0::2], combo, fillvalue="") for p in pair))
    return out


def _local(text: str) -> str:
    return text[len("file://"):] if text.startswith("file://") else text


def normalise(name: str, base: Path | None = None) -> str:
    """A shard's source as the cache records it: a URL as given, a local path absolute (relative to `base`)."""
    if is_url(name) and not name.startswith("file://"):
        return name
    path = Path(_local(name)).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return str(Path(os.path.abspath(path)))


def _what_file(mode: int) -> str:
    """What a file that is not a regular one is, for messages: `a FIFO`, `a character device`, ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _not_regular(mode: int) -> OSError:
    return OSError(errno.EINVAL, f"{_what_file(mode)}, not a regular file")


def _kind(path: Path) -> str:
    """"tar" (ustar magic at 257, or a gzip stream), "listing" (text), or "other" (binary: an image, say). Its head
    read as a regular file, opened non-blocking (a FIFO swapped in cannot hang this)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "listing"  # read_listing reports what it is
            os.set_blocking(fd, True)
            head = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return "listing"  # read_listing reports why
    if head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b":
        return "tar"
    return "other" if b"\0" in head else "listing"


def read_listing(path: Path) -> list[str]:
    """Shard names from a listing file: one per line, blank lines and `#` comments (a whole line, or from a `#`
    after whitespace) ignored; relative paths are relative to the listing's folder. Read up to MAX_LISTING_BYTES (a
    regular file only)."""
    try:
        text = read_regular(path, MAX_LISTING_BYTES).decode("utf-8", "surrogateescape")
    except ValueError as e:
        raise InputError(f"listing {path}: {e}") from None
    except OSError as e:
        raise InputError(f"cannot read listing {path}: {e.strerror or e}") from None
    # a `#` after whitespace starts a comment (a `#` inside a name, as in a URL's fragment, does not)
    names = [_COMMENT.sub("", line).strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(names) > MAX_SHARDS:
        raise InputError(f"listing {path} names {len(names):,} shards; at most {MAX_SHARDS:,} per input")
    return [normalise(n, path.parent) for n in names]


def resolve_inputs(spec: str | os.PathLike[str]) -> list[str]:
    """The shards an input names, normalised and without repeats, in the order given."""
    text = os.fspath(spec)
    if not text.strip():
        raise InputError("no input given: name a folder, a .tar shard, a brace pattern or a listing file")
    local = Path(_local(text))
    if not is_url(text) or text.startswith("file://"):
        st = _stat(str(local))
        if st is not None and stat.S_ISREG(st.st_mode):
            kind = "tar" if text.lower().endswith(TAR_SUFFIXES) else _kind(local)
            if kind == "other":
                raise InputError(f"not a folder: {short(printable(text))} (nor a tar shard or a text file listing "
                                 "shards)")
            names = [normalise(text)] if kind == "tar" else read_listing(local)
        elif "{" in text:
            names = [normalise(n) for n in expand_braces(text)]
        else:
            there = f"{_what_file(st.st_mode)}, not a regular file" if st is not None else "not found"
            raise InputError(f"{short(printable(text))}: {there} (give a folder, a .tar shard, a brace pattern "
                             "like shards/train-{000000..000099}.tar, or a text file listing shards)")
    else:
        names = expand_braces(text) if "{" in text else [text]
    if not names:
        raise InputError(f"{short(printable(text))} names no shards")
    names = list(dict.fromkeys(names))
    _refuse_aliases(names)
    return names


def _refuse_aliases(names: list[str]) -> None:
    """Two local names of one file (a hard link, a symbolic link: the same device and inode) are one shard read
    twice, its rows twice in the cache: refused, naming both (a listing of 2,000 hard links to one shard read it
    2,000 times). Names that cannot be stat'ed are refuse_missing's or the reader's."""
    seen: dict[tuple[int, int], str] = {}
    for name in names:
        if is_url(name):
            continue
        st = _stat(name)
        if st is None:
            continue
        first = seen.setdefault((st.st_dev, st.st_ino), name)
        if first != name:
            raise InputError(f"{short(printable(first))} and {short(printable(name))} are the same file (a hard or "
                             "symbolic link): name each shard once")


def refuse_missing(shards: list[str]) -> None:
    """Refuse, before any work, local shards that do not exist: a typo in a pattern or listing, not a failure to
    record (a URL's object store is asked only when the shard is read: remote failures are recorded there)."""
    missing = []
    for source in shards:
        if is_url(source):
            continue
        try:
            os.stat(source)
        except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in a listed name
            missing.append(source)
        except OSError:
            pass  # there but unreadable (permissions): recorded when read, as a remote failure is
    if missing:
        first = ", ".join(short(printable(m)) for m in missing[:3]) + (f" and {len(missing) - 3:,} more"
                                                                       if len(missing) > 3 else "")
        raise InputError(f"{len(missing):,} of {plural(len(shards), 'shard')} not found: {first}; nothing was "
                         "extracted: check the pattern or listing (quote a brace pattern so the shell leaves it "
                         "alone, e.g. 'shards/train-{000000..000099}.tar')")


def remote_fs(url: str) -> tuple[Any, str]:
    """(fsspec file system, path) for a URL; a missing fsspec or backend is one line naming what to install."""
    return url_fs(url, short(printable(url)), "reading URLs")


@dataclass(frozen=True)
class Identity:
    """What says a shard is unchanged: its size and version (mtime_ns locally, the ETag or modification time an
    object store reports for a URL). Equal identity: the shard's done marker holds."""

    size: int
    version: str


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """A backend's own exceptions (botocore's NoCredentialsError, aiohttp's connection errors, ...) as one line naming
    the URL; OSError (FileNotFoundError, PermissionError: s3fs maps those) passes on to the caller's handling."""
    try:
        yield
    except (OSError, CatdogError):
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{short(printable(url))}: {printable(reason) or type(e).__name__} ({type(e).__name__}): "
                         "check the store's credentials and endpoint (for s3://: AWS_PROFILE or AWS_ACCESS_KEY_ID, "
                         "AWS_ENDPOINT_URL)") from None


def identity(source: str) -> Identity:
    """Raises OSError (missing, unreadable, not a regular file) or InputError (no backend for a URL)."""
    if not is_url(source):
        st = os.stat(source)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st.st_mode)
        return Identity(st.st_size, str(st.st_mtime_ns))
    fs, path = remote_fs(source)
    with remote_errors(source):
        info = fs.info(path)
    version = next((str(info[k]) for k in ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified",
                                           "mtime", "updated", "created") if info.get(k) is not None), "")
    return Identity(int(info.get("size") or 0), version)


class _Sized:
    """A local shard read no further than the size fstat gave when it was opened: a pseudo file that says 0 bytes
    (/proc/kmsg blocks and is consumed by reading) is not read at all."""

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self.fh, self.size, self.left = fh, size, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n) if n else b""
        self.left -= len(data)
        return data


@contextlib.contextmanager
def open_tar(source: str) -> Iterator[IO[bytes]]:
    """A shard as a binary stream, read front to back. A local one is opened non-blocking, checked to be a regular
    file on the open descriptor (a FIFO named x.tar cannot hang the run) and read no further than its size."""
    if is_url(source):
        fs, path = remote_fs(source)
        with remote_errors(source):
            fh = fs.open(path, "rb")
        with fh:
            yield fh
        return
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st.st_mode)
        if st.st_size:
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb", buffering=1 << 20)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield _Sized(fh, st.st_size)  # type: ignore[misc]
