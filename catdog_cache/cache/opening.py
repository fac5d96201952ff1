"""Opening a cache file from outside: looked up once, never followed at its last step, never waiting (a FIFO, socket
or device is named and refused on the descriptor), checked to be the regular file lstat saw and to start with the
HDF5 signature, and read by h5py through that very descriptor. The one place a cache or shard file is opened."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import h5py

from ..errors import CacheBusy, CacheError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# One open per cache file: the name is looked up once, never followed at its last step, and never waits (a FIFO
# opens at once and is refused on the descriptor); h5py then reads that very descriptor's file (see _h5_on_fd).
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
PROC_FD = Path("/proc/self/fd")
HAS_PROC_FD = PROC_FD.is_dir()  # Linux with /proc mounted


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, follow: bool = True) -> tuple[int, os.stat_result]:
    """A cache file opened once for reading: (descriptor, its fstat); the caller closes the descriptor.
    follow: the name is the user's own (--cache, a recorded cache), and links on the way are resolved first, once, as
    extract resolves them; False: a shard, whose name must be the file itself. Either way the final open does not
    follow a link (O_NOFOLLOW) and does not wait (O_NONBLOCK: a FIFO or a device put there in between opens at once),
    and the descriptor must be a regular file, the one lstat saw: nothing but a regular file is ever opened in the
    common case, and a swap between the two is an error, never a hang or another file read."""
    target = path
    if follow:
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13): lstat says what it is
            target = path
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}: run `catdog-cache extract DATA_DIR` first") from None
    except OSError as e:
        raise CacheError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is a folder, not a cache file: give --cache a file name like {path}/features.h5")
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path} is {file_kind(st.st_mode)}, not a cache file: refusing to open it")
    try:
        fd = os.open(target, OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheError(f"{path} became a symbolic link while it was opened; refusing it") from None
        if e.errno == errno.ENOENT:
            raise CacheError(f"{path} vanished while it was opened: run again") from None
        raise CacheError(f"cannot read {path}: {e.strerror}") from None
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise CacheError(f"{path} was replaced while it was opened (now {file_kind(fst.st_mode)}); refusing it")
    return fd, fst


def _h5_on_fd(fd: int, path: Path, **kwargs: object) -> h5py.File:
    """h5py on the file `fd` holds. Linux: through /proc/self/fd/N, which opens that very file again (not a name
    looked up anew), with HDF5's own plain POSIX driver: its reads, locks and get_vfd_handle() are exactly those of an
    open by name (h5py's file-object driver would call Python for every read and take no lock). Elsewhere: by name,
    then checked to be the same file."""
    if HAS_PROC_FD:
        return h5py.File(PROC_FD / str(fd), "r", **kwargs)
    f = h5py.File(path, "r", **kwargs)
    a, b = os.fstat(f.id.get_vfd_handle()), os.fstat(fd)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        f.close()
        raise CacheError(f"{path} was replaced while it was opened; refusing it")
    return f


def open_h5_fd(fd: int, path: Path, **kwargs: object) -> h5py.File:
    """A cache file already opened (open_regular) as h5py reads it, each way HDF5 can fail turned into one line."""
    try:
        return _h5_on_fd(fd, path, **kwargs)
    except OSError as e:
        text = str(e).lower()
        if "errno = 11" in text or "resource temporarily unavailable" in text:
            raise CacheBusy(f"{path} is open for writing by another process: wait for it to finish") from None
        if "errno = 38" in text or "function not implemented" in text or "errno = 37" in text:
            raise CacheError(f"cannot lock {path}: this file system has no file locking; set "
                             "HDF5_USE_FILE_LOCKING=FALSE and run one catdog-cache at a time on it") from None
        raise CacheError(f"{path} is not a readable HDF5 cache (truncated or damaged): delete it and extract again") \
            from None


def file_size(f: h5py.File) -> int:
    """The size of the file h5py has open (its descriptor's, never a second lookup of the name)."""
    return os.fstat(f.id.get_vfd_handle()).st_size


@contextlib.contextmanager
def open_h5(path: Path, follow: bool = True) -> Iterator[h5py.File]:
    """Open a cache for reading, turning each way it can fail into one line that says what to do. The file is opened
    once (open_regular: a regular file, never a FIFO, device or swapped-in link) and read no further than its size:
    a pseudo file whose size says 0 (/proc/kmsg blocks) is not read at all. follow: see open_regular."""
    fd, st = open_regular(path, follow)
    try:
        if st.st_size < len(HDF5_SIGNATURE):  # an empty file, or a /proc pseudo file: nothing to read
            raise CacheError(f"{path} is not a readable HDF5 cache: it has {st.st_size} bytes (empty, or a pseudo "
                             "file, which is never read)")
        head = os.pread(fd, len(HDF5_SIGNATURE), 0)
        if head[:4] == b"PK\x03\x04":  # a head or an export is a zip archive: good files, never "delete it"
            raise CacheError(f"{path} is a zip archive (a head written by fit, or an export), not a feature cache: "
                             "give a head as --head, and --cache the .h5 file it was trained on")
        if head != HDF5_SIGNATURE:
            raise CacheError(f"{path} is not a readable HDF5 cache (not HDF5, or truncated): delete it and extract "
                             "again")
        f = open_h5_fd(fd, path)
    except OSError as e:  # pread of a file that says it has bytes and has none to give
        raise CacheError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        yield f
    finally:
        f.close()

