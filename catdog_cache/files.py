"""Files from outside are hostile: bounded reads of regular files only, exclusive temp files renamed into place,
outputs that cannot overwrite inputs, text made safe for terminals and spreadsheets."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import CatdogError, InputError

if TYPE_CHECKING:
    import torch


class DiskFull(CatdogError):
    """No space (or quota) left where an output goes; nothing half-written was kept."""


def regular_chunks(path: str | os.PathLike[str], limit: int) -> Iterator[bytes]:
    """The bytes of a regular file, as its size says, in chunks. Opened non-blocking (a FIFO swapped in after
    discovery cannot hang the run) and checked on the open descriptor (a link to /dev/zero cannot exhaust memory).
    Never more than the size fstat reports: a pseudo file that says 0 bytes (/proc/kmsg blocks, /proc/self/pagemap
    never ends) is not read at all, and one that yields more than its size is refused. Raises OSError (EINVAL: not a
    regular file or not a plain one; EFBIG: over `limit`, before reading)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, "file too large", os.fspath(path))
        if st.st_size == 0:
            return
        os.set_blocking(fd, True)
        size = 0
        while size <= st.st_size:
            chunk = os.read(fd, min(1 << 20, st.st_size + 1 - size))
            if not chunk:
                return
            size += len(chunk)
            if size > st.st_size:  # grew while read, or a pseudo file whose size means nothing
                raise OSError(errno.EINVAL, "not a plain file (more bytes than its size)", os.fspath(path))
            yield chunk
    finally:
        os.close(fd)


def regular_prefix(path: str | os.PathLike[str], n: int) -> bytes:
    """The first n bytes of a regular file (fewer if it is smaller), opened non-blocking and checked on the
    descriptor, read no further than its size: a FIFO, a device or a /proc pseudo file is never waited on. Raises
    OSError (EINVAL: not a regular file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return os.pread(fd, min(n, st.st_size), 0) if st.st_size else b""
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most `limit` bytes of a regular file (see regular_chunks); ValueError if larger."""
    try:
        return b"".join(regular_chunks(path, limit))
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise ValueError(f"larger than the {limit // 2**20} MiB file limit") from None
        raise


def sha256_regular(path: str | os.PathLike[str], limit: int) -> str:
    """Content hash with the same guarantees as read_regular; OSError (EFBIG) if larger than `limit`."""
    h = hashlib.sha256()
    for chunk in regular_chunks(path, limit):
        h.update(chunk)
    return h.hexdigest()


def plausible_file(path: str | os.PathLike[str], limit: int, min_size: int = 1) -> bool:
    """A path recorded in a file from outside is worth opening: a regular file of min_size..limit bytes, checked on a
    non-blocking descriptor without reading a byte (never a FIFO, device or /proc pseudo file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in the recorded path
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and min_size <= st.st_size <= limit
    finally:
        os.close(fd)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def require_space(folder: Path, needed: int, what: Path) -> None:
    """Refuse before writing rather than discover ENOSPC half-way (HDF5 does not survive a full disk gracefully)."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFull(f"not enough space for {what}: {needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free "
                       f"in {folder}; free some space and run again")


def umask() -> int:
    """The process umask, read without os.umask() (which sets it, racing other threads); Linux has it in /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable; some file systems cannot fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def temp_beside(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temp file created exclusively next to `path` (never a planted name or symlink). Yields its path;
    on success the caller's content is fsynced and renamed over `path`, on any error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:  # a file that is replaced keeps its permissions and group (a 0600 cache stays private)
            old = os.stat(path)
        except OSError:
            old = None
        if old is not None and stat.S_ISREG(old.st_mode):
            with contextlib.suppress(OSError):  # only an owner in that group (or root) may give it
                os.chown(tmp, -1, old.st_gid)
            os.chmod(tmp, stat.S_IMODE(old.st_mode) & 0o777)  # never setuid/setgid bits
        else:
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"disk full while writing {path}: free some space and run again") from None
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None] | bytes) -> Path:
    """Write bytes (or let `write` fill a binary file) to a temp file, fsync, rename over `path`."""
    path = Path(path)
    with temp_beside(path) as tmp, open(tmp, "wb") as fh:
        if isinstance(write, bytes):
            fh.write(write)
        else:
            write(fh)
    return path


def as_paths(value: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None) -> list[Path]:
    """One path, several (an option given more than once), or none, as a list."""
    if value is None or value == "":
        return []
    if isinstance(value, str | os.PathLike):
        return [Path(value)]
    return [Path(v) for v in value]


def file_key(path: Path) -> tuple[int, int] | Path:
    """What makes two paths one file: (device, inode), links followed (a hard link is the same file); the resolved
    path when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return path.resolve()
    return st.st_dev, st.st_ino


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file: the same path once links are resolved, or the same (device, inode) (a hard
    link, a bind mount). The one test for outputs against inputs and for a training cache spelled another way. A
    symbolic-link loop is compared by stat (it has none: not the same), never raised as a traceback."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
        pass
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:  # missing, a loop, or unreadable: nothing there to be the same file
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_outputs(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """Before any work: an output may not be a folder, an input, or another output (e.g. `fit --head` equal to the
    cache, a head named x.png whose curve would overwrite it)."""
    outs = [(k, p) for k, p in outputs.items() if p is not None]
    for name, p in outs:
        if p.is_dir():
            raise InputError(f"{name} {p} is a folder; give a file name")
        for in_name, q in inputs.items():
            if q is not None and same_file(p, q):
                raise InputError(f"{name} {p} is the same file as {in_name}: it would be overwritten")
    for i, (name, p) in enumerate(outs):
        for other, q in outs[i + 1:]:
            if same_file(p, q):
                raise InputError(f"{name} and {other} are the same file ({p}): one would overwrite the other")


def plural(n: int, word: str) -> str:
    """`1 file`, `2 files`: counts in messages read right for one."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def printable(text: str) -> str:
    """Control characters (ESC, newlines, OSC sequences...) from files shown escaped, never sent to the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short(text: str, width: int = 120) -> str:
    """At most `width` characters, cut in the middle (both ends of a path say the most)."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: keep - keep // 2] + "…" + text[len(text) - keep // 2:]


def json_text(text: str) -> str:
    """Valid UTF-8 for --json. A file name that is not UTF-8 arrives with its bytes as lone surrogates
    (surrogateescape), which a strict JSON consumer cannot even decode: such a string is written with each
    undecodable byte as `\\xNN` and each backslash doubled, so its bytes come back with
    `codecs.escape_decode(s.encode())[0]`. Every other string is unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes: show them, escaped
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_char(c: str) -> str:
    """One character of a CSV cell: as printable() shows it, except a newline (the csv module quotes it, and a name
    holding one round-trips) and a non-UTF-8 byte (a surrogate escape: written back as the byte it was)."""
    return c if c.isprintable() or c == "\n" or "\udc80" <= c <= "\udcff" else repr(c)[1:-1]


def csv_cell(text: str) -> str:
    """One rule for every text cell of every CSV written (predictions, submissions, their headers): control
    characters escaped as printable() escapes them for the terminal (a class or file name holding ESC ... BEL, an
    OSC 52 clipboard write, reaches the terminal of whoever runs `cat predictions.csv`), then a leading quote stops
    =, +, -, @ from being run as a formula by a spreadsheet (OWASP CSV injection)."""
    if not text.isprintable():
        text = "".join(map(_csv_char, text))
    return "'" + text if text.startswith(FORMULA_START) else text


def stored_zip(path: Path, limit: int) -> torch._C.PyTorchFileReader:
    """A zip archive from outside (torch.save and torch.export files are zips), checked before any library reads it:
    at most `limit` bytes, every member stored uncompressed, their sizes within the file's size (no decompression
    bomb), no name twice, each local header naming its own member, no two members sharing bytes. Returns torch's own
    reader of it, after checking that torch sees the same members at the same bytes as Python's zipfile: readers
    disagree on duplicates and damaged directories, and what we check must be what torch will load. ValueError says
    what is wrong."""
    import torch  # here, not at the top: the rest of this module is plain file handling

    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{size / 2**20:.0f} MiB, over the {limit // 2**20} MiB limit")
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"not a zip archive: {e}") from None
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > size:
        raise ValueError("compressed or oversized members")
    names = [m.filename for m in members]
    top = names[0].split("/", 1)[0] + "/" if names else ""
    if not all(n.startswith(top) and len(n) > len(top) for n in names):  # torch names members below one folder
        raise ValueError("members outside one top folder")
    if len(set(names)) != len(names):  # zipfile reads the last of two, torch's reader may read the other
        raise ValueError(f"member {next(n for n in names if names.count(n) > 1)!r} appears twice")
    spans = _data_spans(path, members, size)
    try:
        reader = torch._C.PyTorchFileReader(os.fspath(path))
        seen = {n: (reader.get_record_offset(n), reader.get_record_size(n)) for n in reader.get_all_records()}
    except RuntimeError as e:
        raise ValueError(f"torch cannot read it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    ours = {n[len(top):]: span for n, span in spans.items()}
    if len(seen) != len(reader.get_all_records()) or seen != ours:
        raise ValueError("torch's zip reader sees other members than Python's")
    return reader


def _data_spans(path: Path, members: list[zipfile.ZipInfo], size: int) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), from each member's local header, which must carry the same name (the
    central directory and the local headers are two indexes a crafted file can make disagree)."""
    spans, end = {}, 0
    with open(path, "rb") as fh:
        for m in sorted(members, key=lambda m: m.header_offset):
            fh.seek(m.header_offset)
            head = fh.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04" or m.header_offset < end:
                raise ValueError(f"member {m.filename!r} has no local header of its own")
            name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
            if fh.read(name_len) != m.orig_filename.encode("utf-8" if m.flag_bits & 0x800 else "cp437"):
                raise ValueError(f"member {m.filename!r} is named differently in its local header")
            start = m.header_offset + 30 + name_len + extra_len
            end = start + m.compress_size
            if end > size:
                raise ValueError(f"member {m.filename!r} runs past the end of the file")
            spans[m.filename] = (start, m.file_size)
    return spans


def stale_temps(path: Path) -> Iterable[Path]:
    """Temp files that a killed run left next to `path` (regular files only, never a link's target)."""
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        if p.is_file() and not p.is_symlink():
            yield p


@contextlib.contextmanager
def folders_kept_only_if_used(path: Path) -> Iterator[None]:
    """Around a run that creates the folders above `path` (a cache's): when it fails, the folders it created itself
    are removed again if they hold nothing (a failed first extract left an empty cache/ behind). Only empty folders
    go (rmdir), bottom-up, links never followed: anything written there (a saved part) keeps its folder."""
    created = None
    for folder in [path.parent, *path.parent.parents]:
        if os.path.lexists(folder):
            break
        created = folder  # the topmost missing one
    try:
        yield
    except BaseException:
        if created is not None and created.is_dir() and not created.is_symlink():
            for root, _, _ in os.walk(created, topdown=False):  # followlinks=False: a link is an entry, not a walk
                with contextlib.suppress(OSError):  # not empty (or gone): kept
                    os.rmdir(root)
        raise


REMOTE_EXTRA = "pip install 'catdog-cache[remote]'"


def url_fs(url: str, where: str, needs: str) -> tuple[Any, str]:
    """(fsspec file system, path in it) for a URL: tar shards to read, or a cache on object storage. A missing
    fsspec or backend is one line: `where` names the URL as the user gave it, `needs` says what fsspec is for."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise InputError(f"{where}: {needs} needs fsspec: {REMOTE_EXTRA}") from None
    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        hint = known_implementations.get(protocol, {}).get("err") or str(e)
        raise InputError(f"{where}: no fsspec backend for {protocol}:// ({printable(hint)}; "
                         f"{REMOTE_EXTRA} installs those for s3, gs and https)") from None
