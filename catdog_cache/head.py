"""The trained part: Dropout(p) -> Linear(4096, 2), saved with the provenance of the features it was trained on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbone import FEATURE_DIM
from .errors import CacheError

HEAD_FORMAT = 1


class Head(nn.Module):
    """Dropout with an explicit generator (so two training paths can share masks), then the linear classifier."""

    def __init__(self, dropout: float = 0.5, in_dim: int = FEATURE_DIM, classes: int = 2) -> None:
        super().__init__()
        self.dropout = dropout
        self.linear = nn.Linear(in_dim, classes)

    def forward(self, x: torch.Tensor, masks: MaskStream | None = None) -> torch.Tensor:
        if self.training and self.dropout > 0:
            masks = masks if masks is not None else MaskStream(int(torch.randint(2**62, ())))
            x = masks.scale(x.shape, self.dropout).mul_(x)  # [B, D] in the mask's buffer, inverted dropout
        return self.linear(x)  # [B, 2] logits


class MaskStream:
    """A seeded stream of dropout masks: two training paths that share a seed get identical masks.

    Masks are the bulk of fit's work (one random draw per feature per row per epoch), so they are built from raw
    64-bit PCG64 words (numpy; about twice torch's CPU generator) viewed as 8-bit uniforms when 256 * p is whole
    (0.5, 0.25...) or 16-bit ones otherwise, with no bool tensor in between. p off that grid is used at 1/65536
    resolution (0.1 -> 0.100006)."""

    def __init__(self, seed: int) -> None:
        self.bits = np.random.PCG64(seed)
        self._buf: dict[tuple[int, int], torch.Tensor] = {}  # reused: fresh 2 MB buffers cost page faults per step

    def scale(self, shape: torch.Size, p: float) -> torch.Tensor:
        """[B, D] float: 0 with probability p, else 1 / (1 - p). Valid until the next call with the same shape."""
        b, d = shape
        levels = 256 if (p * 256).is_integer() else 65536
        per_word = 8 if levels == 256 else 4
        words = self.bits.random_raw(b * -(-d // per_word))  # uint64, every bit uniform
        u = torch.from_numpy(words.view(np.uint8 if levels == 256 else np.uint16).reshape(b, -1)[:, :d])  # [B, D]
        cut = round(p * levels)
        mask = self._buf.get((b, d))
        if mask is None:
            mask = self._buf[(b, d)] = torch.empty(b, d)
        mask.copy_(u).ge_(cut)  # [B, D] 1.0 = keep, probability 1 - cut / levels
        return mask.mul_(levels / (levels - cut))


def new_head(dropout: float, seed: int) -> Head:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Linear's default init, drawn from a seeded, private stream
        return Head(dropout)


def save_head(path: str | os.PathLike[str], head: Head, meta: dict[str, Any]) -> Path:
    """Write to a temp file and rename: an interrupted save never leaves a partial head."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": HEAD_FORMAT, "dropout": head.dropout, "state_dict": head.state_dict(), **meta}, tmp)
    os.replace(tmp, path)
    return path


def load_head(path: str | os.PathLike[str]) -> tuple[Head, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no head at {path}: run `catdog-cache fit` first (or pass --head PATH)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        head = Head(blob["dropout"])
        head.load_state_dict(blob["state_dict"])
    except Exception as e:
        raise CacheError(f"{path} is not a catdog-cache head ({type(e).__name__}): fit again") from None
    if blob.get("format") != HEAD_FORMAT:
        raise CacheError(f"{path} has head format {blob.get('format')}; this version reads {HEAD_FORMAT}: fit again")
    head.eval()
    return head, blob
