"""WebDataset tar shards -> samples, streamed: members grouped by key, read front to back (tarfile's stream mode, no
seeking, nothing written to disk), decoded in loader workers exactly as files are (ImageFiles.decode).

Conventions: a member's key is its dirname + basename up to the first dot (`a/000123.jpg` -> `a/000123`, extension
`jpg`), except that a Kaggle name `cat.N.ext` / `dog.N.ext` keys at its second dot (`cat.123.jpg` -> `cat.123`), so a
tar of a Kaggle folder reads as its files. Members of one sample are consecutive. The image is the group's first
`.jpg/.jpeg/.png/.webp` member; the label is the `.cls` member (a class index as text, into the run's classes: cat, dog
unless `extract --classes` or the cache names others), else the key's `cat.`/`dog.` prefix, else a class folder in the
key's path (its name one of the classes); unlabeled otherwise. `__x__` metadata members, directories, links,
devices and members without an extension are ignored."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import torch

from ..backbone import Preset
from ..cache.format import CAT_DOG
from ..errors import InputError
from ..extract.loader import ImageFiles
from .decode import MAX_FILE_BYTES
from .folder import UNLABELED
from .spec import open_tar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_HEADER_BYTES = 64 * 2**10  # a GNU long name or pax header larger than this is refused, never allocated
MAX_GLOBAL_KEYS = 256  # global pax records kept by tarfile across the whole stream
MAX_CLS_BYTES = 64
UNREADABLE = "unreadable shard"  # a shard's failure reason (what follows: why): it could not be read at all
NO_IMAGE = "no .jpg/.jpeg/.png/.webp member"  # a sample's failure reason; all of them: the input holds no images


class BadTar(Exception):
    """The tar stream itself is damaged (truncated, an oversized header): a failure record, the rows before stay."""


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


def _add(tf: tarfile.TarFile, m: tarfile.TarInfo, ext: str, s: TarSample, classes: Sequence[str]) -> None:
    """One member into its sample; sizes checked from the header, before any byte is read."""
    if (ext in IMAGE_EXTS and s.data is None or ext == "cls") and not s.reason and m.sparse is not None:
        s.reason = "sparse tar member: not supported"
    elif ext in IMAGE_EXTS and s.data is None and not s.reason:
        if m.size > MAX_FILE_BYTES:
            s.reason = f"member of {m.size:,} bytes: larger than the {MAX_FILE_BYTES // 2**20} MiB file limit"
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
        with tarfile.open(fileobj=fh, mode="r|*", tarinfo=_Member) as tf:
            while (m := tf.next()) is not None:
                tf.members.clear()  # stream mode keeps every header otherwise: memory grows with the shard
                if len(tf.pax_headers) > MAX_GLOBAL_KEYS:
                    raise BadTar(f"more than {MAX_GLOBAL_KEYS} global pax records")
                parts = split_key(m.name) if m.isreg() else None
                if parts is None:
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
                if mine(current.number):
                    _add(tf, m, ext, current, classes)
    except (tarfile.TarError, BadTar, EOFError) as e:
        reason = f"corrupt or truncated tar: {e}"
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
