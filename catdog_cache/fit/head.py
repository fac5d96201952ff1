"""The trained part: Dropout(p) -> Linear(D, K) by default (K classes: 2 for cats and dogs), or an MLP (Linear, ReLU,
Dropout per hidden layer, then Linear(., K)); saved with the provenance of the features it was trained on and its
class names, loaded as hostile input."""

from __future__ import annotations

import io
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cache.format import CAT_DOG, MAX_CLASS_NAME, MAX_CLASSES
from ..cache.opening import HAS_PROC_FD, HDF5_SIGNATURE, OPEN_FLAGS, PROC_FD, file_kind
from ..errors import CacheError
from ..files import stored_zip, write_atomic
from .ahead import take
from .config import MAX_DROPOUT  # defined torch-free: fit's options are checked before torch loads

HEAD_FORMAT = 1
MAX_HEAD_BYTES = 2 * 2**30  # pool5 (25,088-d) + two 4096 hidden layers is about 0.5 GB


class Head(nn.Module):
    """Dropout with an explicit generator (so two training paths can share masks), then the classifier."""

    def __init__(self, dropout: float = 0.5, in_dim: int = 4096, hidden: tuple[int, ...] = (),
                 classes: int = 2) -> None:
        super().__init__()
        self.dropout, self.in_dim, self.hidden_sizes, self.n_classes = dropout, in_dim, tuple(hidden), classes
        dims = [in_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.linear = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor, masks: MaskStream | None = None) -> torch.Tensor:
        drop = self.training and self.dropout > 0
        if drop:
            masks = masks if masks is not None else MaskStream(int(torch.randint(2**62, ())))
        if not self.hidden:
            x, double = self.drop_linear(x, masks) if drop else (x, False)
            w = self.linear.weight * 2.0 if double else self.linear.weight  # [K, D]
            # W @ x^T: BLAS is about 3x faster in this orientation than x @ W^T for a 2-row weight
            return torch.mm(w, x.t()).t() + self.linear.bias  # [B, K] logits
        for layer in self.hidden:
            x = torch.relu(layer(x))  # [B, H]
            if drop:  # autograd keeps the mask for backward: a private copy, not the reused buffer
                x = x * masks.scale(x.shape, self.dropout).clone()
        return self.linear(x)  # [B, K] logits

    def drop_linear(self, x: torch.Tensor, masks: MaskStream) -> tuple[torch.Tensor, bool]:
        """A linear head's dropout in training: (the batch the classifier sees [B, D], whether its weight is to be
        doubled). The one place the masks are applied, so fit's autograd-free step (step.py) drops what forward
        drops."""
        if self.dropout == 0.5:  # the default: one random bit per feature, x is the step's own buffer
            # inverted dropout's 1 / (1 - p) goes on the K x D weight (doubled) instead of the B x D batch: exact
            return x.mul_(masks.keep(x.shape)), True  # [B, D], half the features zeroed in place
        return masks.scale(x.shape, self.dropout).mul_(x), False  # [B, D] in the mask's buffer, inverted dropout

    def describe(self) -> str:
        layers = [f"Linear({a}, {b}), ReLU, Dropout({self.dropout:g})"
                  for a, b in zip([self.in_dim, *self.hidden_sizes], self.hidden_sizes, strict=False)]
        last = f"Linear({([self.in_dim, *self.hidden_sizes])[-1]}, {self.n_classes})"
        return " -> ".join(layers + [last]) if layers else f"Dropout({self.dropout:g}) -> {last}"


class MaskStream:
    """A seeded stream of dropout masks: two training paths that share a seed get identical masks.

    Masks are the bulk of fit's work (one random draw per feature per row per epoch), so they are built from raw
    64-bit PCG64 words (numpy; about twice torch's CPU generator) viewed as 8-bit uniforms when 256 * p is whole
    (0.5, 0.25...) or 16-bit ones otherwise, with no bool tensor in between. p off that grid is used at 1/65536
    resolution (0.1 -> 0.100006)."""

    def __init__(self, seed: int) -> None:
        self.bits = np.random.PCG64(seed)
        self._buf: dict[tuple[int, int], list[torch.Tensor]] = {}  # reused: fresh 2 MB buffers cost page faults
        self._turn: dict[tuple[int, int], int] = {}
        self.ring = 1  # buffers per shape, handed out in turn: a batch prepared ahead (fit.ahead) holds several

    def keep_bits(self, shape: torch.Size) -> torch.Tensor:
        """[B, D] uint8 0/1 for p = 0.5: one random bit per feature (8x fewer generator words than a byte each)."""
        b, d = shape
        words = self.bits.random_raw(b * -(-d // 64))  # uint64, every bit uniform
        return torch.from_numpy(np.unpackbits(words.view(np.uint8)).reshape(b, -1)[:, :d])  # [B, D]

    def keep(self, shape: torch.Size) -> torch.Tensor:
        """keep_bits as float32 0/1 in a reused buffer (valid for `ring` calls with the same shape): x * 1.0
        and x * 0.0 are what x * the uint8 bit gives, but multiplying by a uint8 tensor casts it to a fresh
        float32 temporary every step, and its page faults cost more than the multiply."""
        return self._buffer(shape).copy_(self.keep_bits(shape))  # [B, D]

    def _buffer(self, shape: torch.Size) -> torch.Tensor:
        return take(self._buf, self._turn, tuple(shape), self.ring, lambda: torch.empty(*shape))

    def scale(self, shape: torch.Size, p: float) -> torch.Tensor:
        """[B, D] float: 0 with probability p, else 1 / (1 - p). Valid for `ring` calls with the same shape."""
        b, d = shape
        levels = 256 if (p * 256).is_integer() else 65536
        per_word = 8 if levels == 256 else 4
        words = self.bits.random_raw(b * -(-d // per_word))  # uint64, every bit uniform
        u = torch.from_numpy(words.view(np.uint8 if levels == 256 else np.uint16).reshape(b, -1)[:, :d])  # [B, D]
        cut = round(p * levels)
        mask = self._buffer(shape)
        mask.copy_(u).ge_(cut)  # [B, D] 1.0 = keep, probability 1 - cut / levels
        return mask.mul_(levels / (levels - cut))


class DeviceMaskStream(MaskStream):
    """MaskStream's numbers, made on `device`: the same PCG64 words are drawn on the host in large blocks (the stream
    is sequential, so one large draw is many small ones), uploaded once per block (8x less than the unpacked masks),
    and unpacked there in numpy's order: unpackbits' most significant bit first, uint16 views little-endian. So a
    GPU fit drops exactly the features a CPU fit drops (tests/fit/test_head.py compares the two on the CPU)."""

    BLOCK_WORDS = 1 << 21  # 16 MiB per upload: about 1.6 epochs of a 20,000-row, 4096-d linear head

    def __init__(self, seed: int, device: torch.device) -> None:
        super().__init__(seed)
        self.device = device
        self._bytes = torch.empty(0, dtype=torch.uint8, device=device)  # drawn, uploaded, not yet used
        self._shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)  # [8] bit 7 first, as unpackbits

    def _take(self, words: int) -> torch.Tensor:
        """The stream's next `words` 64-bit words as [8 * words] uint8 on the device."""
        if self._bytes.numel() < 8 * words:
            fresh = torch.from_numpy(self.bits.random_raw(max(words, self.BLOCK_WORDS)).view(np.uint8))
            self._bytes = torch.cat([self._bytes, fresh.to(self.device)])
        out, self._bytes = self._bytes[: 8 * words], self._bytes[8 * words :]
        return out

    def keep(self, shape: torch.Size) -> torch.Tensor:
        return self.keep_bits(shape)  # unpacked on the device: no host-side cast

    def keep_bits(self, shape: torch.Size) -> torch.Tensor:
        b, d = shape
        raw = self._take(b * -(-d // 64)).view(b, -1, 1)  # [B, 8 * words per row, 1] uint8
        return torch.bitwise_right_shift(raw, self._shifts).bitwise_and_(1).view(b, -1)[:, :d]  # [B, D] 0/1

    def scale(self, shape: torch.Size, p: float) -> torch.Tensor:
        b, d = shape
        levels = 256 if (p * 256).is_integer() else 65536
        raw = self._take(b * -(-d // (8 if levels == 256 else 4)))  # [8 * words] uint8
        if levels == 65536:
            pairs = raw.view(-1, 2).to(torch.int32)  # [4 * words, 2] (low byte, high byte)
            raw = pairs[:, 0].bitwise_or(pairs[:, 1].bitwise_left_shift(8))  # [4 * words] uint16 values
        u = raw.view(b, -1)[:, :d]  # [B, D]
        cut = round(p * levels)
        return u.ge(cut).to(torch.float32).mul_(levels / (levels - cut))  # [B, D] 0 or 1 / (1 - p)


def new_head(dropout: float, seed: int, in_dim: int = 4096, hidden: tuple[int, ...] = (), classes: int = 2) -> Head:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Linear's default init, drawn from a seeded, private stream
        return Head(dropout, in_dim, hidden, classes)


def is_cat_dog(classes: list[str] | tuple[str, ...]) -> bool:
    """The Kaggle Redux task: its submission, its P(dog) clip and its binary log loss apply."""
    return list(classes) == list(CAT_DOG)


def check_classes(classes: Any, path: Path) -> list[str]:
    """A head's recorded class names: 2 to 127 distinct non-empty strings of at most 255 characters."""
    if classes is None:
        return list(CAT_DOG)
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in classes)
            and len(set(classes)) == len(classes)):
        raise CacheError(f"{path}: its class names are not 2 to {MAX_CLASSES} distinct names; damaged or crafted")
    return classes


def save_head(path: str | os.PathLike[str], head: Head, meta: dict[str, Any]) -> Path:
    """Serialise in memory, then an exclusive temp file renamed into place: an interrupted save or a full disk never
    leaves a partial head, and a planted `head.pt.tmp` link is never followed."""
    buf = io.BytesIO()
    torch.save({"format": HEAD_FORMAT, "dropout": head.dropout, "in_dim": head.in_dim,
                "hidden": list(head.hidden_sizes), "state_dict": head.state_dict(), **meta}, buf)
    return write_atomic(path, buf.getvalue())


def _check_archive(opened: Path, path: Path) -> None:
    """Before torch.load: a plain, uncompressed torch.save zip no larger than its file (no decompression bomb).
    `opened`: where to read it; `path`: its name in messages."""
    try:
        stored_zip(opened, MAX_HEAD_BYTES)
    except (ValueError, OSError) as e:
        raise CacheError(f"{path} is not a catdog-cache head ({e}): refusing it") from None


def open_head(path: Path) -> int:
    """The head file opened once, as cache files are (cache/opening.py): links on the way resolved first (the name is
    the user's own), the last step never followed, never waiting (a FIFO opens at once), and refused on the
    descriptor unless a regular file. Returns the descriptor; the caller closes it."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13): the open says so
        target = path
    try:
        fd = os.open(target, OPEN_FLAGS)
    except FileNotFoundError:
        raise CacheError(f"no head at {path}: run `catdog-cache fit` first (or pass --head PATH)") from None
    except OSError as e:
        raise CacheError(f"cannot read --head {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CacheError(f"--head {path} is a folder, not a head file")
        raise CacheError(f"--head {path} is {file_kind(mode)}, not a head file: refusing to read it")
    return fd


def _number(blob: dict[str, Any], key: str, default: float, ok, what: str, path: Path) -> float:
    value = blob.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise CacheError(f"{path}: {key} {value!r} is not {what}; the head is damaged or crafted")
    return float(value)


def _check_config(config: Any, path: Path) -> None:
    """The recorded fit settings that preview replays (the validation split): as `fit` checks them."""
    if not isinstance(config, dict):
        raise CacheError(f"{path}: config {type(config).__name__} is not a mapping; the head is damaged or crafted")
    _number(config, "seed", 0, lambda v: type(v) is int and 0 <= v < 2**63, "a seed in [0, 2**63)", path)
    _number(config, "val_fraction", 0.2, lambda v: 0 <= v < 1, "a fraction in [0, 1)", path)


def _owns_its_bytes(t: torch.Tensor) -> bool:
    """Contiguous, from offset 0, over a storage exactly its size: the file then holds every byte the head declares
    (bounded by MAX_HEAD_BYTES), as torch.save writes a real head."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def load_head(path: str | os.PathLike[str]) -> tuple[Head, dict[str, Any]]:
    """A head file from anywhere: size and archive checked, tensors only (weights_only), every field validated."""
    from ..cache import Provenance

    path = Path(path)
    fd = open_head(path)
    try:
        if os.pread(fd, 8, 0) == HDF5_SIGNATURE:
            raise CacheError(f"--head {path} is a feature cache, not a head: pass the .head.pt file that fit wrote")
        # every later read opens that very file again (/proc/self/fd), never the name: a swap cannot slip in
        opened = PROC_FD / str(fd) if HAS_PROC_FD else path
        _check_archive(opened, path)
        try:
            blob = torch.load(opened, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CacheError(f"{path} is not a catdog-cache head ({type(e).__name__}): fit again") from None
    finally:
        os.close(fd)
    if not isinstance(blob, dict):
        raise CacheError(f"{path} is not a catdog-cache head: fit again")
    if blob.get("format") != HEAD_FORMAT:
        raise CacheError(f"{path} has head format {blob.get('format')!r}; this version reads {HEAD_FORMAT}: fit again")
    dropout = _number(blob, "dropout", -1, lambda v: 0 <= v <= MAX_DROPOUT, f"a dropout in [0, {MAX_DROPOUT}]",
                      path)
    _number(blob, "temperature", 1.0, lambda v: 0 < v <= 1e3, "a positive temperature", path)
    _number(blob, "clip", 0.0, lambda v: 0 <= v < 0.5, "a clip in [0, 0.5)", path)
    _check_config(blob.get("config", {}), path)
    blob["classes"] = check_classes(blob.get("classes"), path)
    state = blob.get("state_dict")
    hidden, in_dim = blob.get("hidden", []), blob.get("in_dim")
    if in_dim is None and isinstance(state, dict) and isinstance(state.get("linear.weight"), torch.Tensor):
        in_dim = state["linear.weight"].shape[-1]  # heads written before MLP heads existed
    if not (isinstance(hidden, list) and all(type(h) is int and 0 < h <= 65536 for h in hidden) and len(hidden) <= 8
            and type(in_dim) is int and 0 < in_dim <= 1 << 20):
        raise CacheError(f"{path}: head shape (in_dim {in_dim!r}, hidden {hidden!r}) is invalid; damaged or crafted")
    Provenance.from_json(blob.get("provenance"), f"head {path}")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and
                                              t.layout == torch.strided for t in state.values()):
        raise CacheError(f"{path}: weights are not dense float32 tensors; damaged or crafted")
    if not all(_owns_its_bytes(t) for t in state.values()):  # a stride-0 view declares any size in 4 bytes
        raise CacheError(f"{path}: weights are views into shared or smaller storage, not tensors of their own; "
                         "damaged or crafted")
    with torch.device("meta"):
        head = Head(dropout, in_dim, tuple(hidden), len(blob["classes"]))  # shapes only: tensors assigned below
    try:
        head.load_state_dict(state, assign=True)
    except Exception as e:
        raise CacheError(f"{path}: weights do not fit a {head.describe()} head ({type(e).__name__}); damaged or "
                         "crafted") from None
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise CacheError(f"{path} holds NaN or infinite weights: fit again (with a lower --lr)")
    head.eval()
    return head, blob
