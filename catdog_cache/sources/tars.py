"""WebDataset tar shards -> samples, streamed: members grouped by key, read front to back (tarfile's stream mode, no
seeking, nothing written to disk), decoded in loader workers exactly as files are (ImageFiles.decode).

Conventions: a member's key is its dirname + basename up to the first dot (`a/000123.jpg` -> `a/000123`, extension
`jpg`), except that a Kaggle name `cat.N.ext` / `dog.N.ext` keys at its second dot (`cat.123.jpg` -> `cat.123`), so a
tar of a Kaggle folder reads as its files. Members of one sample are consecutive. The image is the group's first
`.jpg/.jpeg/.png/.webp` member; the label is the `.cls` member (a class index as text, into the run's classes: cat, dog
unless `extract --classes` or the cache names others), else the key's `cat.`/`dog.` prefix, else a class folder in the
key's path (its name one of the classes); unlabeled otherwise. `__x__` metadata members, directories, links,
devices and members without an extension are ignored.

A shard is hostile until read. tarfile parses the headers (_Member bounds what it would allocate; a sparse member's
map is never built), from bytes _TarBytes hands it: a `.tar.gz/.bz2/.xz` is decompressed here, a bounded amount at a
time and at most MAX_INFLATE_RATIO times its size in all. A member whose header declares more than the shard holds
ends the shard before anything skips it, and the reader moves past members itself, never beyond the bytes there."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import torch

from ..backbone import Preset
from ..cache.format import CAT_DOG
from ..errors import InputError
from ..extract.loader import ImageFiles
from ..files import printable, short
from .decode import MAX_FILE_BYTES
from .folder import UNLABELED
from .spec import open_tar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_HEADER_BYTES = 64 * 2**10  # a GNU long name or pax header larger than this is refused, never allocated
MAX_GLOBAL_KEYS = 256  # global pax records kept by tarfile across the whole stream
MAX_CLS_BYTES = 64
MAX_INFLATE_RATIO = 100  # a compressed shard decompresses to at most this many times its size (tars of photos: ~1)
MIN_INFLATE_BYTES = 64 * 2**20  # ... or to this many bytes, whichever is more (a small tar of small files: more)
_CHUNK = 64 * 2**10  # bytes read or skipped at a time
UNREADABLE = "unreadable shard"  # a shard's failure reason (what follows: why): it could not be read at all
NO_IMAGE = "no .jpg/.jpeg/.png/.webp member"  # a sample's failure reason; all of them: the input holds no images


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


def split_key(name: str) -> tuple[str, str] | None:
    """Member name -> (key, extension lowercased), or None for members that belong to no sample."""
    name = name[2:] if name.startswith("./") else name
    folder, _, base = name.rpartition("/")
    if not base or (base.startswith("__") and base.endswith("__")):
        return None
    stem, dot, ext = base.partition(".")
    if stem.lower() in CAT_DOG and "." in ext:  # Kaggle: cat.123.jpg -> key cat.123
        n, _, ext = ext.partition(".")
        stem = f"{stem}.{n}"
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def key_label(key: str, classes: Sequence[str] = CAT_DOG) -> int:
    """The label a key's name gives: the Kaggle `cat.`/`dog.` prefix of its basename (when cat or dog is a class),
    else its nearest folder named like a class (case-insensitively, as class folders are)."""
    *folders, base = key.split("/")
    prefix, dot, _ = base.partition(".")
    if dot and prefix.lower() in CAT_DOG and prefix.lower() in classes:
        return classes.index(prefix.lower())
    for part in reversed(folders):
        if part.lower() in classes:
            return classes.index(part.lower())
    return UNLABELED


@dataclass
class TarSample:
    key: str
    number: int  # the sample's position in its shard
    data: bytes | None = None  # the image member's bytes
    label: int | None = None  # from .cls; None: from the key
    reason: str = ""  # why the sample cannot be used


def _cls_label(text: bytes, classes: Sequence[str]) -> int:
    value = text.decode("ascii", "replace").strip()
    if not value.isdigit() or not 0 <= int(value) < len(classes):
        more = " (name more classes with extract --classes)" if tuple(classes) == CAT_DOG else ""
        raise ValueError(f"bad .cls member: expected a class index 0..{len(classes) - 1}{more}, got {value[:20]!r}")
    return int(value)


def _too_large(m: tarfile.TarInfo) -> str:
    return f"member of {m.size:,} bytes: larger than the {MAX_FILE_BYTES // 2**20} MiB file limit"


def _add(tf: tarfile.TarFile, m: tarfile.TarInfo, ext: str, s: TarSample, classes: Sequence[str]) -> None:
    """One member into its sample; sizes checked from the header, before any byte is read."""
    if (ext in IMAGE_EXTS and s.data is None or ext == "cls") and not s.reason and m.sparse is not None:
        s.reason = "sparse tar member: not supported"
    elif ext in IMAGE_EXTS and s.data is None and not s.reason:
        if m.size > MAX_FILE_BYTES:
            s.reason = _too_large(m)
        else:
            s.data = tf.extractfile(m).read()  # type: ignore[union-attr]
    elif ext == "cls" and not s.reason:
        try:
            if m.size > MAX_CLS_BYTES:
                raise ValueError(f"bad .cls member: {m.size:,} bytes")
            s.label = _cls_label(tf.extractfile(m).read(), classes)  # type: ignore[union-attr]
        except ValueError as e:
            s.reason = str(e)


def read_samples(fh: IO[bytes], mine: Callable[[int], bool] = lambda n: True, classes: Sequence[str] = CAT_DOG
                 ) -> Iterator[TarSample]:
    """Samples of a tar stream in member order; only those `mine(number)` accepts have their members read (the
    others are skipped over); a `.cls` member indexes `classes`. A damaged stream ends with a sample whose reason
    says so (the sample being read, or an empty key); OSError (the stream could not be read) propagates: the shard
    is retried on the next run."""
    seen: set[str] = set()
    current: TarSample | None = None
    n = 0
    try:
        stream = _TarBytes(fh)
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_Member) as tf:  # type: ignore[call-overload]
            for m, bad in _members(tf, stream):
                parts = split_key(m.name) if m.isreg() else None
                if parts is None:
                    if bad:
                        raise bad  # the sample in progress may have more members: not a row
                    continue
                key, ext = parts
                if current is None or key != current.key:
                    if current is not None:
                        if mine(current.number):
                            yield current
                        n += 1
                    current = TarSample(key, n)
                    if key in seen:
                        current.reason = "key repeated in the shard (a sample's members must be consecutive)"
                    seen.add(key)
                if bad:  # after the sample before it, which is whole (a sample's members are consecutive)
                    if ext in IMAGE_EXTS and m.size > MAX_FILE_BYTES and not current.reason:
                        current.reason = _too_large(m)  # the first reason wins: the one the sample's own check gives
                    raise bad
                if mine(current.number):
                    _add(tf, m, ext, current, classes)
    except (tarfile.TarError, BadTar, EOFError) as e:
        reason = f"{getattr(e, 'what', BadTar.what)}: {e}"
        if current is None:
            current = TarSample("", n)
        current.data, current.reason = None, current.reason or reason  # its members may be cut: not a row
    except OSError:
        raise
    except Exception as e:  # zlib and other decompressor errors: the stream's content, not its transport
        current = TarSample(current.key if current else "", current.number if current else n, None,
                            reason=(current.reason if current else "") or f"corrupt tar: {type(e).__name__}: {e}")
    if current is not None and mine(current.number):
        yield current


class Ref(NamedTuple):
    """A sample's item id through the loader: its shard (position in the run's list), key and label."""

    shard: int
    key: str
    label: int


class End(NamedTuple):
    """A loader item that ends one reader's pass over a shard; `error` set: the shard could not be read."""

    shard: int
    readers: int  # how many workers read this shard (each sends an End)
    error: str = ""


class TarSamples(torch.utils.data.IterableDataset):
    """Shards -> (Ref, views or None, sha256, reason) items as ImageFiles gives them, then one End per shard and
    reader. With at least as many shards as workers each worker reads whole shards (worker w: shards w, w+W, ...);
    with fewer, every worker streams every shard and decodes every W-th sample, so decoding stays parallel."""

    def __init__(self, shards: list[str], views: tuple[str, ...], preset: Preset, decoder: str = "pil",
                 classes: Sequence[str] = CAT_DOG) -> None:
        self.shards = shards
        self.classes = tuple(classes)  # label i means classes[i]: the cache's numbering
        self.files = ImageFiles(None, [], views, preset, decoder)

    def __iter__(self) -> Iterator[tuple[Any, Any, str, str]]:
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        if len(self.shards) >= workers:
            mine, readers = [i for i in range(len(self.shards)) if i % workers == w], 1
            def owns(n: int) -> bool:
                return True
        else:
            mine, readers = list(range(len(self.shards))), workers
            def owns(n: int) -> bool:
                return n % workers == w
        for i in mine:
            yield from self._shard(i, owns, readers)

    def _shard(self, i: int, owns: Callable[[int], bool], readers: int) -> Iterator[tuple[Any, Any, str, str]]:
        try:
            with open_tar(self.shards[i]) as fh:
                for s in read_samples(fh, owns, self.classes):
                    label = s.label if s.label is not None else key_label(s.key, self.classes)
                    ref = Ref(i, s.key, label)
                    if s.data is None:
                        yield ref, None, "", s.reason or NO_IMAGE
                    elif s.reason:
                        yield ref, None, hashlib.sha256(s.data).hexdigest(), s.reason
                    else:
                        yield self.files.decode(ref, s.data)
        except (OSError, InputError) as e:  # unreadable now (network, permissions): not done, retried next run
            yield End(i, readers, f"{UNREADABLE}: {getattr(e, 'strerror', None) or e}"), None, "", ""
            return
        yield End(i, readers), None, "", ""
