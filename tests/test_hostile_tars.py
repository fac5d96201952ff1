"""Hostile tar input, each crafted here: member sizes declared past the end of the shard (GNU base-256, pax), sparse
maps, decompression bombs (gzip, bzip2, xz), hard-linked and non-regular shards, brace bounds of thousands of
digits, and the words said about them. A hang is the failure: readers run under a join timeout."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from catdog_cache.errors import InputError
from catdog_cache.sources import tars
from catdog_cache.sources.spec import expand_braces, resolve_inputs
from tests.conftest import TINY
from tests.test_tars import make_tar

BLOCK = 512
END = b"\0" * 1024  # the end-of-archive marker


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, fmt: int = tarfile.GNU_FORMAT,
           pax: dict[str, str] | None = None) -> bytes:
    """A member's header block(s) as tarfile writes them: GNU writes a size of 8 GiB or more in base-256, pax as a
    `size=` record."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    if pax:
        info.pax_headers = pax
    return info.tobuf(fmt)


def member(name: str, data: bytes, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    return header(name, len(data), fmt=fmt) + data + b"\0" * (-len(data) % BLOCK)


def with_checksum(block: bytes | bytearray) -> bytes:
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() in a thread; a failure if it is still running after `seconds` (it is left to spin: a daemon)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def samples(data: bytes | io.RawIOBase) -> list[tars.TarSample]:
    fh = io.BytesIO(data) if isinstance(data, bytes) else data
    return within(20, lambda: list(tars.read_samples(fh)))


class Unsized(io.RawIOBase):
    """A stream whose size is not known (an HTTP body without a length): not seekable, no `size`."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = len(self.data[self.pos:self.pos + len(b)])
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


# 9: sparse maps (old GNU `S` extension chains, GNU.sparse pax keys) are never built


def old_gnu_sparse(name: str, blocks: int) -> bytes:
    """An old GNU sparse member (`S`) whose header is followed by `blocks` extension blocks of 21 map entries each:
    tarfile collects every entry into a list before anything can refuse the member."""
    head = bytearray(header(name, 0, tarfile.GNUTYPE_SPARSE))
    head[482] = 1  # isextended
    out = [with_checksum(head)]
    entries = b"".join(b"%011o\0%011o\0" % (4096 * (i + 1), 4096) for i in range(21))
    for i in range(blocks):
        ext = bytearray(entries + b"\0" * (BLOCK - len(entries)))
        ext[504] = i < blocks - 1
        out.append(bytes(ext))
    return b"".join(out)


def pax_sparse_10(name: str, numbers: int) -> bytes:
    """A GNU 1.0 pax sparse member: its data opens with a map of as many numbers as its first line says."""
    body = b"%d\n" % (numbers // 2) + b"".join(b"%d\n" % (100_000 + i) for i in range(numbers))
    body += b"\0" * (-len(body) % BLOCK)
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name, "GNU.sparse.realsize": "4096"}
    return header(f"GNUSparseFile.0/{name}", len(body), fmt=tarfile.PAX_FORMAT, pax=pax) + body


def test_sparse_members_refused_before_any_map_is_built(images):
    """A 10 MB chain of `S` extension blocks, a 1.0 pax map of a million numbers: tarfile built their maps (a
    214 KiB .tar.gz took 3.1 GiB) before the sample could say "sparse: not supported". The member is refused from
    its header and passed over; the members after it are read."""
    dog = images["dog.1.jpg"]
    shards = {
        "S": old_gnu_sparse("s.jpg", 20_000) + member("dog.1.jpg", dog) + END,
        "1.0": pax_sparse_10("s.jpg", 1_000_000) + member("dog.1.jpg", dog) + END,
        "0.1": header("s.jpg", 0, fmt=tarfile.PAX_FORMAT, pax={"GNU.sparse.map": ",".join(["4096"] * 2000),
                                                                 "GNU.sparse.size": "8192"})
        + member("dog.1.jpg", dog) + END,
        # a GNU.sparse key alone: tarfile takes realsize for the size and would read 3,000 bytes of a 100-byte member
        "realsize": header("s.jpg", 100, fmt=tarfile.PAX_FORMAT, pax={"GNU.sparse.realsize": "3000"})
        + b"\xff" * 100 + b"\0" * 412 + member("dog.1.jpg", dog) + END,
    }
    for kind, data in shards.items():
        tracemalloc.start()
        sparse, after = samples(data)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (sparse.key, sparse.data, sparse.reason) == ("s", None, "sparse tar member: not supported"), kind
        assert after.key == "dog.1" and after.data == dog and not after.reason, kind
        assert peak < 4 * 2**20, (kind, peak)  # the data themselves: 10 MB and 7 MB


# 13: two listed names of one file


def test_hard_and_symbolic_links_to_one_shard_refused(tmp_path, images, cli):
    """A listing naming one shard under 2,000 hard links read it 2,000 times (20,000: 46 s a command, rows
    duplicated): two local names with one (device, inode) are refused in one line naming both."""
    shard = make_tar(tmp_path / "s" / "a.tar", [("cat.0.jpg", images["cat.0.jpg"])])
    other = make_tar(tmp_path / "s" / "b.tar", [("dog.1.jpg", images["dog.1.jpg"])])
    (tmp_path / "links").mkdir()
    for i in range(2000):
        os.link(shard, tmp_path / "links" / f"{i}.tar")
    listing = tmp_path / "list.txt"
    listing.write_text("s/b.tar\n" + "".join(f"links/{i}.tar\n" for i in range(2000)))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"links/0\.tar and .*links/1\.tar are the same file"):
        resolve_inputs(listing)
    assert time.perf_counter() - t0 < 2
    (tmp_path / "sym.tar").symlink_to(shard)
    listing.write_text("s/a.tar\ns/b.tar\nsym.tar\n")
    with pytest.raises(InputError, match=r"s/a\.tar and .*sym\.tar are the same file \(a hard or symbolic link\)"):
        resolve_inputs(listing)
    result = cli("extract", listing, "--cache", tmp_path / "c.h5", *TINY, "--workers", "0", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and "are the same file" in result.output
    assert not (tmp_path / "c.h5").exists()
    listing.write_text("s/a.tar\ns/b.tar\n")  # distinct files: fine
    assert resolve_inputs(listing) == [str(shard), str(other)]


# 15: brace bounds of thousands of digits


def test_brace_bound_of_5000_digits_is_one_line(tmp_path, cli):
    """int() refuses strings of more than 4,300 digits with a ValueError: that was a traceback."""
    bound = "1" * 5000
    for pattern in (f"s-{{{bound}..2}}.tar", f"memory://b/s-{{0..{bound}}}.tar"):
        with pytest.raises(InputError, match="a brace range bound of 5,000 digits; at most 18"):
            expand_braces(pattern)
        with pytest.raises(InputError, match="5,000 digits"):  # a local one, too long a name to stat, the same
            resolve_inputs(pattern)
    result = cli("extract", f"s-{{{bound}..2}}.tar", "--cache", tmp_path / "c.h5", *TINY, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and "5,000 digits" in result.output
    assert len(expand_braces("s-{000000000000000000..000000000000000001}.tar")) == 2  # 18 digits: fine
    with pytest.raises(InputError, match="neither a list"):  # not ASCII digits: not a range, as in the shell
        expand_braces("s-{\u0661..\u0663}.tar")
