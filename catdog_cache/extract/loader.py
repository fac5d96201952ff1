"""Extract's stages that run beside the loop feeding the backbone: decoding in loader workers (ImageFiles, the
collate that lays batches out as the backbone reads them), the thread counts that keep workers and the forward
off each other's cores, and the writer thread that turns batches into parts."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backbone import Preset
from ..files import read_regular
from ..machine import affinity_cores
from ..sources.decode import MAX_FILE_BYTES, DecodeError, decode_rgb, jpeg_payload, tensor_views, views_of
from .pacing import Gate, attach, decoding

Failure = tuple[int, str, str]  # (item index, sha256 or "", reason)
Batch = tuple[list[int], np.ndarray, list[str], list[Failure]]  # (item indices, features [B, V, D], sha256s, failures)


class ImageFiles(torch.utils.data.Dataset):
    """Index -> (index, [V, 3, 224, 224] or None, sha256 of the bytes decoded, failure reason).

    With decoder="torchvision" the item is instead ("jpeg", raw bytes) for plain JPEGs, to be decoded in a batch on
    the extraction device, or ("rgb", [3, H, W] uint8) decoded by Pillow; `device_batch` finishes both. The worker
    then only reads, hashes and checks the marker structure: no pixel work."""

    def __init__(self, root: Any, rels: list[str], views: tuple[str, ...], preset: Preset, decoder: str = "pil"
                 ) -> None:
        self.root, self.rels, self.views, self.decoder = root, rels, views, decoder
        self.transform = preset.transform()
        self.draft = preset.resize if decoder == "pil-draft" else 0

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> tuple[int, Any, str, str]:
        try:  # a regular file, opened non-blocking, read up to the limit: the file may have changed since discovery
            data = read_regular(self.root / self.rels[i], MAX_FILE_BYTES)
        except ValueError as e:
            return i, None, "", str(e)
        except OSError as e:
            return i, None, "", f"unreadable: {e.strerror or e}"
        return self.decode(i, data)

    def decode(self, i: Any, data: bytes) -> tuple[Any, Any, str, str]:
        """Bytes -> (i, views or a "jpeg"/"rgb" item, sha256, failure reason): shared with tar input (tars.py).
        In a loader worker on a CPU, it waits while the forward needs this worker's core (pacing.Gate)."""
        with decoding():
            return self._decode(i, data)

    def _decode(self, i: Any, data: bytes) -> tuple[Any, Any, str, str]:
        sha = hashlib.sha256(data).hexdigest()  # in the worker, from the bytes it decodes: no second read
        try:
            if self.decoder == "torchvision":
                jpeg = jpeg_payload(data)  # cut at its end marker, bounded by its pixel count; None: Pillow's
                if jpeg is not None:
                    return i, ("jpeg", torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)), sha, ""
                return i, ("rgb", rgb_tensor(decode_rgb(data))), sha, ""
            return i, views_of(decode_rgb(data, self.draft), self.views, self.transform), sha, ""
        except DecodeError as e:
            return i, None, sha, str(e)
        except Exception as e:  # a decoder bug on one file must not end a multi-hour run
            return i, None, sha, f"decode failed: {type(e).__name__}: {e}"


def rgb_tensor(image: Any) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] uint8."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _shared_empty(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """In a loader worker, born in shared memory (as default_collate does): sent as one handle, no copy into shared
    memory when pickled; in the main process, an ordinary tensor."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty_strided(shape, stride, dtype=dtype)
    n = int(np.prod(shape))  # dense layouts only: every element once
    storage = torch.UntypedStorage._new_shared(n * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, stride)


def channels_last_batch(items: list[torch.Tensor]) -> torch.Tensor:
    """[V, 3, S, S] each -> [B, V, 3, S, S] whose images are channels-last, as the backbone runs. Done here, in the
    loader worker, with one copy into shared memory: the main process then neither stacks nor converts (it fed the
    GPU and ran the forward while paying for both), and the worker skips the copy into shared memory that
    pickling a private tensor costs."""
    v, c, h, w = items[0].shape
    n = len(items) * v
    out = _shared_empty((n, c, h, w), (c * h * w, 1, w * c, c), items[0].dtype)  # channels-last [B*V, 3, S, S]
    for k, x in enumerate(items):
        out[k * v:(k + 1) * v].copy_(x)
    return out.unflatten(0, (len(items), v))  # [B, V, 3, S, S]


@dataclass
class Encoded:
    """decoder="torchvision": one loader batch before decoding. The JPEG bytes of all its images in one buffer
    (one shared-memory handle per batch rather than one per image, which the main process would pay for), JPEG
    j being data[ends[j - 1]:ends[j]]; the images Pillow decoded ([3, H, W] uint8); order[k] = (True, j) for the
    batch's k-th image if it is JPEG j, (False, j) if it is Pillow's image j."""

    data: torch.Tensor  # [total bytes] uint8
    ends: list[int]
    rgb: list[torch.Tensor]
    order: list[tuple[bool, int]]

    def pin_memory(self) -> Encoded:  # called by the DataLoader's pin-memory thread (pin_memory=True on a GPU)
        return Encoded(self.data.pin_memory(), self.ends, [t.pin_memory() for t in self.rgb], self.order)

    def jpegs(self) -> list[torch.Tensor]:
        """[n_j] uint8 views of the buffer, one per JPEG: contiguous, no copy."""
        return [self.data[s:e] for s, e in zip([0, *self.ends[:-1]], self.ends, strict=True)]


def encode_batch(items: list[tuple[str, torch.Tensor]]) -> Encoded:
    jpegs = [t for kind, t in items if kind == "jpeg"]
    ends = np.cumsum([len(t) for t in jpegs]).tolist()
    data = _shared_empty((ends[-1] if ends else 0,), (1,), torch.uint8)
    if jpegs:
        torch.cat(jpegs, out=data)
    order, n = [], [0, 0]
    for kind, _ in items:
        order.append((kind == "jpeg", n[kind == "jpeg"]))
        n[kind == "jpeg"] += 1
    return Encoded(data, ends, [t for kind, t in items if kind != "jpeg"], order)


def collate(batch: list[tuple[int, Any, str, str]]) -> tuple[Any, list[int], list[str], list[Failure]]:
    good = [b for b in batch if b[1] is not None]
    if good and isinstance(good[0][1], tuple):  # decoder="torchvision": decoded later, on the device
        x: Any = encode_batch([b[1] for b in good])
    else:
        x = channels_last_batch([b[1] for b in good]) if good else None  # [B, V, 3, 224, 224]
    return x, [b[0] for b in good], [b[2] for b in good], [(b[0], b[2], b[3]) for b in batch if b[1] is None]


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes ([n] uint8 on the host) -> [3, H, W] uint8 on `device`: one decode_jpeg call for the list (one
    batched nvJPEG decode on a GPU). No EXIF rotation: jpeg_payload sends rotated photos to Pillow instead."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def device_batch(enc: Encoded, idx: list[int], shas: list[str], views: tuple[str, ...], device: torch.device,
                 preset: Preset) -> tuple[torch.Tensor | None, list[int], list[str], list[Failure]]:
    """decoder="torchvision": decode the batch's JPEGs together on the device (nvJPEG on a GPU), then resize, crop
    and normalise there. A batch that fails to decode is retried image by image; a JPEG the device's decoder
    refuses is given to Pillow, whose verdict (its pixels, or its reason) stands, as on every decoder."""
    data = enc.jpegs()
    jpegs: list[Any] = [None] * len(data)  # [3, H, W] uint8 each, or Pillow's reason for refusing it
    failed: list[Failure] = []
    try:
        jpegs = list(decode_jpegs(data, device)) if data else []
    except RuntimeError:
        for j, one in enumerate(data):
            try:
                jpegs[j] = decode_jpegs([one], device)[0]
            except RuntimeError:
                jpegs[j] = _pillow_verdict(one)
    images: list[torch.Tensor | None] = []
    for k, (is_jpeg, j) in enumerate(enc.order):
        img = jpegs[j] if is_jpeg else enc.rgb[j]
        if isinstance(img, str):
            failed.append((idx[k], shas[k], img))
            img = None
        images.append(img)
    keep = [k for k, img in enumerate(images) if img is not None]
    x = tensor_views([images[k] for k in keep], views, device, preset) if keep else None  # [B, V, 3, S, S]
    return x, [idx[k] for k in keep], [shas[k] for k in keep], failed


def _pillow_verdict(data: torch.Tensor) -> Any:
    """A JPEG the device's decoder refused: Pillow's image ([3, H, W] uint8 on the host) or Pillow's reason."""
    try:
        return rgb_tensor(decode_rgb(bytes(data.numpy())))
    except DecodeError as e:
        return str(e)
    except Exception as e:
        return f"decode failed: {type(e).__name__}: {e}"


def cores() -> int:
    """The cores this process may use: its CPU affinity (a container's or taskset's share), divided among the
    ranks that torchrun started on this machine."""
    return max(1, affinity_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def worker_init(worker: int, gate: Gate | None = None) -> None:
    torch.set_num_threads(1)  # one decode per worker: the workers are the parallelism
    attach(gate, worker)


def default_workers(n_items: int, cpu: bool = False) -> int:
    """Decode workers sized to the machine. Small runs decode in process: starting workers costs more. Extracting
    on a CPU, one per core: a Gate keeps them off the cores the forward runs on, and they all decode while it waits.
    Feeding a GPU, one core is left for the main process (it feeds the device, receives the batches)."""
    return 0 if n_items < 64 else max(1, cores() - (0 if cpu else 1))


def forced_threads() -> int:
    """CATDOG_EXTRACT_THREADS, the forward's intra-op threads when a user fixes them; 0 when unset."""
    forced = os.environ.get("CATDOG_EXTRACT_THREADS")
    return max(1, int(forced)) if forced else 0


def extract_threads(workers: int) -> int:
    """Intra-op threads of the main process feeding a GPU, chosen as fit chooses its own (fit.train_threads): the
    cores the decode workers leave, at least 1. More threads than free cores make every op wait on a descheduled
    thread (a new user's trial lost nearly half the rate that way beside other jobs). CATDOG_EXTRACT_THREADS
    overrides. On a CPU the forward's threads are measured and chosen batch by batch instead (pacing.Pacer)."""
    return forced_threads() or max(1, cores() - workers)


class PartWriter:
    """Batches -> parts on a thread of its own, so building and writing a part (np.stack, HDF5 image, fsync) never
    stalls the loop feeding the backbone. `write(batches)` writes one part; it runs every `rows` rows or `seconds`
    seconds, and once more on close(). A kill -9 loses the batches not yet written: at most one part's worth plus
    the few queued. The writer's error is raised in the caller, by the next put() or by close()."""

    def __init__(self, write: Callable[[list[Batch]], None], rows: int, seconds: float, depth: int = 8) -> None:
        self.write, self.rows, self.seconds = write, rows, seconds
        self.error: BaseException | None = None
        self._raised = self._closed = False
        self._queue: queue.Queue[Batch | None] = queue.Queue(depth)  # bounded: memory stays bounded
        self._thread = threading.Thread(target=self._run, name="catdog-part-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: list[Batch] = []
        n, last = 0, time.monotonic()
        while (batch := self._queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so that put() never blocks on a dead writer
            pending.append(batch)
            n += len(batch[0]) + len(batch[3])
            if n >= self.rows or time.monotonic() - last > self.seconds:
                pending, n, last = self._flush(pending), 0, time.monotonic()
        if self.error is None:
            self._flush(pending)

    def _flush(self, pending: list[Batch]) -> list[Batch]:
        try:
            if pending:
                self.write(pending)
        except BaseException as e:  # handed to the caller's thread
            self.error = e
        return []

    def _raise(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True
            raise self.error

    def put(self, batch: Batch) -> None:
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Write what is left and wait for it; raises the writer's error if the caller has not seen it yet."""
        if not self._closed:
            self._queue.put(None)
            self._closed = True
        self._thread.join()
        self._raise()
