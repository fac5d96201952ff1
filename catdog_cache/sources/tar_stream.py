"""A tar's members read front to back from a hostile byte stream: tarfile parses the headers (_Member bounds what it
would allocate; a sparse member's map is never built) from bytes _TarBytes hands it: a `.tar.gz/.bz2/.xz` is
decompressed here, a bounded amount at a time and at most MAX_INFLATE_RATIO times its size in all. A member whose
header declares more than the shard holds is reported before anything skips it, and the reader moves past members
itself, never beyond the bytes there."""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from ..files import printable, short

MAX_HEADER_BYTES = 64 * 2**10  # a GNU long name or pax header larger than this is refused, never allocated
MAX_GLOBAL_KEYS = 256  # global pax records kept by tarfile across the whole stream
MAX_INFLATE_RATIO = 100  # a compressed shard decompresses to at most this many times its size (tars of photos: ~1)
MIN_INFLATE_BYTES = 64 * 2**20  # ... or to this many bytes, whichever is more (a small tar of small files: more)
_CHUNK = 64 * 2**10  # bytes read or skipped at a time


class BadTar(Exception):
    """The tar stream itself is damaged (truncated, an oversized header): a failure record, the rows before stay."""

    what = "corrupt or truncated tar"


class Refused(BadTar):
    """The stream declares, or decompresses to, more than the shard holds: it ends before the reader goes there."""

    what = "refused tar"


class _Member(tarfile.TarInfo):
    """tarfile's header parsing with bounds on what it would allocate: no header block shorter than 512 bytes (the
    stream ended without its end-of-archive marker: truncated, which tarfile would take for a clean end), no
    long-name or pax header larger than MAX_HEADER_BYTES (tarfile reads those whole into memory, at whatever size the
    header declares), and no sparse map (old GNU `S` extension chains, GNU.sparse pax keys): a sparse member is marked
    (`sparse == []`), its map neither read into memory nor parsed, and refused as a sample; its stored bytes are
    skipped like any member's."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        if len(buf) != tarfile.BLOCKSIZE:
            raise BadTar("truncated (no end-of-archive marker)" if not buf else "truncated inside a header")
        return super().frombuf(buf, encoding, errors)

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER_BYTES:
            raise BadTar(f"a {self.size:,}-byte extended header (at most {MAX_HEADER_BYTES:,})")
        return super()._proc_member(tf)  # type: ignore[misc]

    def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        """Old GNU sparse (`S`): the header's extension blocks are passed over one at a time, never kept."""
        _, extended, realsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while extended:
            block = tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            if len(block) != tarfile.BLOCKSIZE:
                raise BadTar("truncated inside a sparse header")
            extended = bool(block[504])
        self.sparse = []
        self.offset_data = tf.fileobj.tell()  # type: ignore[union-attr]
        tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = realsize
        return self

    # GNU pax sparse formats 0.0, 0.1, 1.0: tarfile would parse the map (1.0: read from the member's data, as many
    # numbers as its first line declares); the member is only marked
    def _proc_gnusparse_00(self, next: tarfile.TarInfo, pax_headers: dict[str, str], buf: bytes) -> None:
        next.sparse = []

    def _proc_gnusparse_01(self, next: tarfile.TarInfo, pax_headers: dict[str, str]) -> None:
        next.sparse = []

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str], tf: tarfile.TarFile) -> None:
        next.sparse = []

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None:
        super()._apply_pax_info(pax_headers, encoding, errors)  # type: ignore[misc]
        if self.sparse is None and any(k.startswith("GNU.sparse.") for k in pax_headers):
            self.sparse = []  # a GNU.sparse key alone (realsize, name) changes what the member's size means


class _TarBytes:
    """A shard's bytes as tarfile's uncompressed stream mode (`r|`) reads them. A gzip, bzip2 or xz/lzma shard
    (recognised by the magic numbers tarfile's `r|*` uses) is decompressed here: _CHUNK bytes at a time (tarfile
    decompresses whatever 10 KB of input holds in one call: gigabytes, for bzip2) and at most limit() bytes in all.
    Concatenated streams (pigz, pbzip2) read as one; bytes after the last are ignored, as tarfile ignores them."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.size = _size_of(fh)
        self.pending = b""  # input read but not yet used
        while len(self.pending) < tarfile.BLOCKSIZE and (more := fh.read(tarfile.BLOCKSIZE - len(self.pending))):
            self.pending += more
        if not self.pending:
            raise BadTar("empty (0 bytes)")
        self.read_in = len(self.pending)  # bytes read from fh
        self.out = 0  # bytes decompressed
        self.buf, self.at = b"", 0  # decompressed, handed to tarfile up to `at`
        self.kind = _compression(self.pending)
        self.unit = self._decompressor() if self.kind != "tar" else None

    def limit(self) -> int | None:
        """The most bytes tarfile may get: an uncompressed shard's size (None: not known), else the larger of
        MIN_INFLATE_BYTES and MAX_INFLATE_RATIO times the compressed size (the bytes read so far when not known)."""
        if self.kind == "tar":
            return self.size
        return max(MIN_INFLATE_BYTES, MAX_INFLATE_RATIO * (self.size if self.size is not None else self.read_in))

    def _decompressor(self) -> Any:
        if self.kind == "gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return bz2.BZ2Decompressor() if self.kind == "bz2" else lzma.LZMADecompressor()

    def _input(self, n: int = _CHUNK) -> bytes:
        if self.pending:
            data, self.pending = self.pending[:n], self.pending[n:]
            return data
        data = self.fh.read(n)
        self.read_in += len(data)
        return data

    def read(self, n: int) -> bytes:
        if self.unit is None:
            return self._input(n)
        if self.at >= len(self.buf):
            self.buf, self.at = self._inflate(), 0
        data = self.buf[self.at:self.at + n]
        self.at += len(data)
        return data

    def _inflate(self) -> bytes:
        """The next at most _CHUNK decompressed bytes (b"": the end)."""
        limit = self.limit()
        assert limit is not None
        n = min(_CHUNK, limit + 1 - self.out)  # a byte past the limit shows it exceeded
        while True:
            if self.unit.eof:  # another stream may follow
                rest = self.unit.unused_data + self.pending
                self.pending = b""
                while len(rest) < 10 and (more := self._input()):
                    rest += more
                if _compression(rest) != self.kind:
                    return b""
                self.unit, self.pending = self._decompressor(), rest
            if self.kind == "gz":
                data = self.unit.unconsumed_tail or self._input()
                end = not data
            else:
                data = self._input() if self.unit.needs_input else b""
                end = not data and self.unit.needs_input
            try:
                # input ended early: zlib may still hold the end of a match; tarfile then finds the tar truncated
                out = (self.unit.flush() if self.kind == "gz" else b"") if end else self.unit.decompress(data, n)
            except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:  # bz2 raises OSError: data, not transport
                raise BadTar(f"invalid compressed data ({e})") from None
            if out:
                self.out += len(out)
                if self.out > limit:
                    raise Refused(f"decompresses to more than {limit:,} bytes ({self._allowance()}): a "
                                  "decompression bomb, or data too compressible for a compressed shard (give such a "
                                  "tar uncompressed)")
                return out
            if end:
                return b""

    def _allowance(self) -> str:
        read = f"its {self.size:,} bytes" if self.size is not None else f"the {self.read_in:,} bytes read so far"
        return f"{MAX_INFLATE_RATIO} times {read}, at least {MIN_INFLATE_BYTES // 2**20} MiB"


def _compression(head: bytes) -> str:
    """tarfile's `r|*` detection (_StreamProxy.getcomptype): "gz", "bz2", "xz" or "tar"."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gz"
    if head[0:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "bz2"
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return "xz"
    return "tar"


def _size_of(fh: IO[bytes]) -> int | None:
    """How many bytes `fh` has left: its `size` (open_tar's local reader, fsspec's files), else by seeking."""
    size = getattr(fh, "size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    try:
        if not fh.seekable():
            return None
        here = fh.tell()
        end = fh.seek(0, os.SEEK_END)
        fh.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return end - here


def _members(tf: tarfile.TarFile, stream: _TarBytes) -> Iterator[tuple[tarfile.TarInfo, BadTar | None]]:
    """tf's members in order, each with what is wrong with its header: a declared size past what the shard holds
    (an uncompressed shard's size; what a compressed one may decompress to), checked before anything reads or skips
    it; the caller raises it once it knows the member's sample. After each member the reader moves to the next header
    itself, a chunk at a time, ending where the bytes end (tarfile's stream mode loops over a declared size even past
    the end: 2**80 bytes is forever)."""
    limit = stream.limit() if stream.kind == "tar" or stream.size is not None else None
    while (m := tf.next()) is not None:
        tf.members.clear()  # stream mode keeps every header otherwise: memory grows with the shard
        if len(tf.pax_headers) > MAX_GLOBAL_KEYS:
            raise BadTar(f"more than {MAX_GLOBAL_KEYS} global pax records")
        # where the reader will skip to; and, but for a sparse member (its size is the file's, not what is stored),
        # where its declared size ends
        end = tf.offset if m.sparse is not None else max(tf.offset, m.offset_data + m.size)
        name = short(printable(m.name), 80)
        if m.size < 0:
            yield m, BadTar(f"member {name!r} declares a negative size")
        elif limit is not None and end > limit:
            yield m, (BadTar(f"member {name!r} declares {m.size:,} bytes, past the end of the shard ({limit:,} bytes)")
                      if stream.kind == "tar" else
                      Refused(f"member {name!r} declares {m.size:,} bytes, more than the shard may decompress to "
                              f"({limit:,} bytes: {stream._allowance()})"))
        else:
            yield m, None
        left = tf.offset - tf.fileobj.tell()  # type: ignore[attr-defined,union-attr]
        while left > 0:
            got = len(tf.fileobj.read(min(left, _CHUNK)))  # type: ignore[union-attr]
            if not got:
                raise BadTar("unexpected end of data (the stream ends inside a member)")
            left -= got


@contextlib.contextmanager
def open_members(fh: IO[bytes]) -> Iterator[tuple[tarfile.TarFile, Iterator[tuple[tarfile.TarInfo, BadTar | None]]]]:
    """The tar stream `fh` opened for reading members in order: the TarFile (to read a member's bytes) and its members,
    each with what is wrong with its header (None when nothing is)."""
    stream = _TarBytes(fh)
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_Member) as tf:  # type: ignore[call-overload]
        yield tf, _members(tf, stream)
