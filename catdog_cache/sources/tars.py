"""WebDataset tar shards -> samples, streamed: members grouped by key, read front to back (tarfile's stream mode, no
seeking, nothing written to disk), decoded in loader workers exactly as files are (ImageFiles.decode).

Conventions: a member's key is its dirname + basename up to the first dot (`a/000123.jpg` -> `a/000123`, extension
`jpg`), except that a Kaggle name `cat.N.ext` / `dog.N.ext` keys at its second dot (`cat.123.jpg` -> `cat.123`), so a
tar of a Kaggle folder reads as its files. Members of one sample are consecutive. The image is the group's first
`.jpg/.jpeg/.png/.webp` member; the label is the `.cls` member (a class index as text, into the run's classes: cat, dog
unless `extract --classes` or the cache names others), else the key's `cat.`/`dog.` prefix, else a class folder in the
key's path (its name one of the classes); unlabeled otherwise. `__x__` metadata members, directories, links,
devices and members without an extension are ignored.

A shard is hostile until read: its members come from tar_stream.py (bounded headers, bounded decompression, declared
sizes checked before anything skips them); a member whose header is refused ends the shard."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple, TypeVar

import torch

from ..backbone import Preset
from ..cache.format import CAT_DOG
from ..errors import InputError
from ..extract.loader import ImageFiles
from .decode import MAX_FILE_BYTES
from .folder import UNLABELED
from .spec import open_tar
from .tar_stream import BadTar, open_members

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_CLS_BYTES = 64
UNREADABLE = "unreadable shard"  # a shard's failure reason (what follows: why): it could not be read at all
NO_IMAGE = "no .jpg/.jpeg/.png/.webp member"  # a sample's failure reason; all of them: the input holds no images


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
        with open_members(fh) as (tf, members):
            for m, bad in members:
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


K = TypeVar("K")


def picked_images(wanted: dict[str, dict[str, K]]) -> dict[K, bytes]:
    """Image bytes of picked samples, {shard: {key: id}} -> {id: bytes}: each shard streamed once, read no further than
    its last pick. A sample without a decodable image, or a shard gone or unreadable since it was extracted, is left
    out (preview and audit draw what they can)."""
    out: dict[K, bytes] = {}
    for source, picks in wanted.items():
        keys = dict(picks)
        try:
            with open_tar(source) as fh:
                for sample in read_samples(fh):
                    at = keys.pop(sample.key, None)
                    if at is not None and sample.data is not None and not sample.reason:
                        out[at] = sample.data
                    if not keys:
                        break
        except OSError:
            continue
    return out
