"""Hostile tar input, each crafted here: member sizes declared past the end of the shard (GNU base-256, pax), sparse
maps, decompression bombs (gzip, bzip2, xz), hard-linked and non-regular shards, brace bounds of thousands of
digits, and the words said about them. A hang is the failure: readers run under a join timeout."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from catdog_cache.cache import read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import InputError
from catdog_cache.sources import tar_stream, tars
from catdog_cache.sources.spec import expand_braces, open_tar, resolve_inputs
from tests.conftest import TINY
from tests.extract.test_tars import CFG, make_tar

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


# 8: a member declaring 2**80 bytes (GNU base-256) or 10**24 (pax) in a file of a few KB


def test_declared_sizes_past_the_end_end_the_shard_at_once(tmp_path, images):
    """tarfile's stream mode skips a member by reading its declared size, block after block, past the end of the
    data: a 2.5 KB tar declaring 2**80 bytes ran forever. Every member's declared size (here members that are no
    image: nothing reads them, the reader only skips them) is checked against what the shard holds first."""
    cat = images["cat.0.jpg"]
    gnu = member("cat.0.jpg", cat) + header("x.bin", 2**80) + b"\0" * 1024
    assert gnu[len(gnu) - 1536 + 124] == 0x80  # the size field is base-256
    pax = member("cat.0.jpg", cat) + header("x.bin", 10**24, fmt=tarfile.PAX_FORMAT) + b"\0" * 1024
    assert b"size=1000000000000000000000000\n" in pax
    negative = bytearray(header("x.bin", 0))
    negative[124:136] = b"\xff" * 12  # base-256 -1
    negative_tar = member("cat.0.jpg", cat) + with_checksum(negative) + END
    for data, declared in ((gnu, "1,208,925,819,614,629,174,706,176 bytes"),
                           (pax, "1,000,000,000,000,000,000,000,000 bytes"), (negative_tar, "a negative size")):
        first, refused = samples(data)
        assert first.key == "cat.0" and first.data == cat and not first.reason  # the sample before is whole
        assert refused.key == "x" and refused.data is None
        assert f"member 'x.bin' declares {declared}" in refused.reason
        if declared[0].isdigit():
            assert f"past the end of the shard ({len(data):,} bytes)" in refused.reason
    # compressed, the bound is what the shard may decompress to
    (refused,) = samples(gzip.compress(header("x.bin", 10**24, fmt=tarfile.PAX_FORMAT) + END))
    assert "declares 1,000,000,000,000,000,000,000,000 bytes, more than the shard may decompress to" in refused.reason
    # a stream of unknown size: the reader skips what is there, then finds it short
    (cut,) = samples(Unsized(header("x.bin", 2**80) + b"\0" * 1024))
    assert cut.key == "x" and "unexpected end of data" in cut.reason
    # end to end: one failure record naming the shard; the other shard's rows are extracted
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.tar").write_bytes(gnu)
    good = make_tar(tmp_path / "s" / "b.tar", [("dog.1.jpg", images["dog.1.jpg"])])
    r = within(120, lambda: extract(str(tmp_path / "s" / "{a,b}.tar"), tmp_path / "c.h5", CFG))
    assert r.rows == 2 and r.extracted == 2  # cat.0 from a.tar, dog.1 from b.tar
    (failed,) = r.failed
    assert failed[0].startswith(str(tmp_path / "s" / "a.tar")) and f"shard ({len(gnu):,} bytes)" in failed[1]
    assert good.exists()


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


# 10: decompression is bounded per read and per shard


def zeros_tar(n: int, members: int = 1) -> bytes:
    return b"".join(header(f"z{i}.bin", n) + bytes(n) for i in range(members)) + END


def test_decompression_bombs_capped(tmp_path, images, monkeypatch):
    """A 2 MiB .tar.gz of 2 GiB of zeros ran past a minute: tarfile's stream mode decompressed it all to skip it
    (and handed bzip2's output over in one piece: 10 KB of input, gigabytes). Decompression stops at
    MAX_INFLATE_RATIO times the compressed size (at least MIN_INFLATE_BYTES; 1 MiB here, to keep the bombs small),
    a bounded amount at a time, with one failure record; ordinary compressed shards read as before."""
    monkeypatch.setattr(tar_stream, "MIN_INFLATE_BYTES", 2**20, raising=False)  # raising: the old reader had none
    payload = zeros_tar(2**24)  # one 16 MiB member of zeros
    bombs = {"gz": gzip.compress(payload, 1), "bz2": bz2.compress(payload, 1), "xz": lzma.compress(payload, preset=0)}
    for kind, bomb in bombs.items():
        assert len(bomb) * 100 < 2**24, kind
        # the size known (a file): the member declares more than the shard may decompress to
        (refused,) = samples(bomb)
        limit = max(2**20, 100 * len(bomb))
        assert f"declares 16,777,216 bytes, more than the shard may decompress to ({limit:,} bytes" in refused.reason
        # the size not known (a stream): decompression itself stops, a bounded amount held at a time
        tracemalloc.start()
        (refused,) = samples(Unsized(bomb))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert re.match(r"refused tar: decompresses to more than [0-9,]+ bytes \(100 times the [0-9,]+ bytes read so "
                        r"far, at least 1 MiB\): a decompression bomb", refused.reason), (kind, refused.reason)
        assert peak < 2 * 2**20, (kind, peak)
    # many members, each small: the shard's total is what is capped
    (*_, refused) = samples(Unsized(gzip.compress(zeros_tar(2**16, 64), 1)))
    assert refused.key == "z31" and "refused tar: decompresses to more than" in refused.reason
    # ordinary shards, compressed each way, and concatenated streams (pigz, pbzip2): the same samples
    names = sorted(images)
    plain = make_tar(tmp_path / "p.tar", [(n, images[n]) for n in names]).read_bytes()
    want = [(s.key, s.data) for s in samples(plain)]
    assert len(want) == 8
    half = len(plain) // 2
    for compress in (gzip.compress, bz2.compress, lzma.compress):
        for data in (compress(plain), compress(plain[:half]) + compress(plain[half:])):
            assert [(s.key, s.data, s.reason) for s in samples(data)] == [(k, d, "") for k, d in want]
    # end to end: a bomb beside a good shard is one failure record naming it, the good shard's rows are kept
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "bomb.tar.gz").write_bytes(bombs["gz"])
    (tmp_path / "s" / "good.tar.gz").write_bytes(gzip.compress(plain))
    r = within(120, lambda: extract(str(tmp_path / "s" / "{bomb,good}.tar.gz"), tmp_path / "c.h5", CFG))
    assert r.extracted == 8
    (failed,) = r.failed
    assert failed[0].startswith(str(tmp_path / "s" / "bomb.tar.gz")) and "refused tar" in failed[1]


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


# 12 and 17: local shards are regular files, read no further than their size; messages say what they found


def test_fifos_devices_and_pseudo_files_as_shards(tmp_path, images, cli):
    """A FIFO named f.tar given as the input was "not found"; a /proc file (0 bytes by its size: /proc/kmsg blocks,
    and reading it consumes the kernel's log) was read as a tar. Now the FIFO is named for what it is, and a
    listed FIFO, device or /proc file is one failure line; nothing is read past a file's size."""
    fifo = tmp_path / "f.tar"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"f\.tar: a FIFO, not a regular file"):
        resolve_inputs(fifo)
    result = cli("extract", fifo, "--cache", tmp_path / "x.h5", *TINY, ok=False)
    assert result.exit_code == 1 and "a FIFO, not a regular file" in result.output and "not found" not in result.output
    # /proc/self/status: a regular file of 0 bytes by fstat that yields text when read
    proc = Path("/proc/self/status")
    if proc.exists():
        assert os.stat(proc).st_size == 0

        def read_proc() -> list[tars.TarSample]:
            with open_tar(str(proc)) as fh:
                return list(tars.read_samples(fh))

        (empty,) = within(10, read_proc)
        assert empty.reason == "corrupt or truncated tar: empty (0 bytes)"  # nothing read (else: "invalid header")
    good = make_tar(tmp_path / "good.tar", [("cat.0.jpg", images["cat.0.jpg"])])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\n/dev/null\n{good}\n")
    with pytest.raises(InputError, match=r"2 of 3 shards could not be read, first .*f\.tar: a FIFO, not a regular "
                       r"file; the other shards' rows are saved \(1 row"):
        within(120, lambda: extract(listing, tmp_path / "c.h5", CFG))
    assert [p.decode() for p in read_index(tmp_path / "c.h5").paths] == ["cat.0"]
    listing.write_text(f"/dev/null\n{good}\n")
    with pytest.raises(InputError, match="1 of 2 shards could not be read, first /dev/null: a character device, not a "
                       "regular file"):
        within(120, lambda: extract(listing, tmp_path / "c.h5", CFG))


def test_ray_rerun_message_counts(tmp_path, images, cli):
    """`all 1 input shard were done already`: the counts read right for one (no Ray starts: every shard is done)."""
    one = make_tar(tmp_path / "s" / "a-0.tar", [("cat.0.jpg", images["cat.0.jpg"])])
    make_tar(tmp_path / "s" / "a-1.tar", [("dog.1.jpg", images["dog.1.jpg"])])
    cache = tmp_path / "c.h5"
    cli("extract", tmp_path / "s" / "a-{0..1}.tar", "--cache", cache, *TINY, "--workers", "0", "--quiet")
    result = cli("extract", one, "--cache", cache, "--engine", "ray")
    assert "ray: the input shard was done already; no task ran" in result.output
    result = cli("extract", tmp_path / "s" / "a-{0..1}.tar", "--cache", cache, "--engine", "ray")
    assert "ray: all 2 input shards were done already; no task ran" in result.output
