"""Prove the promise: training the head on cached features equals training it through the frozen network.

Both paths call `fit.train` (one loop) with the same config; only `features_of` differs: a row lookup in the cache
versus a full forward pass of the frozen backbone on the decoded images, every epoch, as the article intended."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .backbone import Preset
from .cache import read_features, read_index
from .engines.dispatch import extract
from .errors import InputError
from .extract.config import ExtractConfig
from .extract.loader import ImageFiles
from .fit import Features, FitConfig, evaluate, fit, labeled_rows, split, train, training_device
from .fit.head import load_head
from .sources.folder import discover


@dataclass
class VerifyReport:
    n_images: int
    n_val: int
    epochs: int
    max_weight_diff: float
    max_bias_diff: float
    max_streamed_diff: float  # head fitted in memory vs streamed from disk, two chunks at a time
    max_prob_diff: float
    differing_labels: int
    cached_loss: float
    e2e_loss: float
    cached_acc: float
    e2e_acc: float
    extract_seconds: float
    fit_seconds: float
    e2e_seconds: float
    identity_expected: bool  # float32 cache and fp32 extraction: exact agreement is the claim
    tolerance: float

    @property
    def agree(self) -> bool:
        return self.max_prob_diff <= self.tolerance and self.differing_labels == 0 and self.max_streamed_diff == 0

    @property
    def speedup(self) -> float:
        return self.e2e_seconds / max(self.extract_seconds + self.fit_seconds, 1e-9)


def balanced_subset(data_dir: Path, limit: int | None) -> list[str]:
    """The first limit/K images of each of the K classes in sorted order (sorted Kaggle names would be all cats);
    the first limit % K classes take one more (cats, for two)."""
    disc = discover(data_dir)
    found = disc.samples
    samples = [s for s in found if s.label >= 0]
    if found and not samples:
        raise InputError(f"{data_dir} has {len(found)} images but no labels: verify needs one folder per class "
                         "(cat/ and dog/) or cat.N.jpg / dog.N.jpg names")
    if limit is None:
        return [s.rel for s in samples]
    k = len(disc.classes)
    per_class = [[s.rel for s in samples if s.label == c] for c in range(k)]
    return sorted(rel for c in range(k) for rel in per_class[c][: limit // k + (c < limit % k)])


def network_features(data_dir: Path, paths: list[bytes], model: torch.nn.Module, preset: Preset) -> Features:
    """Row indices -> features computed now, from the image files, through the frozen network (no cache)."""
    files = ImageFiles(data_dir, [os.fsdecode(p) for p in paths], ("center",), preset)
    device = next(model.parameters()).device

    def through_network(rows: torch.Tensor) -> torch.Tensor:
        x = torch.stack([files[int(i)][1][0] for i in rows])  # [B, 3, S, S]
        with torch.no_grad():
            y = model(x.to(device, memory_format=torch.channels_last))  # [B, D]
        return y.float().cpu()

    return through_network


def max_diff(a: torch.nn.Module, b: torch.nn.Module, kind: str) -> float:
    """Largest |difference| over every layer's weights (or biases) of two heads of the same shape."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa if k.endswith(kind))


def verify(data_dir: str | os.PathLike[str], ecfg: ExtractConfig, fcfg: FitConfig, limit: int | None = None,
           tolerance: float = 1e-5, e2e_seed: int | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> VerifyReport:
    data_dir = Path(data_dir)
    if limit is not None and limit < 4:
        raise InputError(f"--limit must be at least 4, got {limit}")
    if not (math.isfinite(tolerance) and tolerance >= 0):  # nan would make every comparison "disagree: 0 > nan"
        raise InputError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    rels = balanced_subset(data_dir, limit)
    backbone = ecfg.resolve()
    model = backbone.build(ecfg.weights)  # built once, shared: the comparison times training, not loading
    with tempfile.TemporaryDirectory(prefix="catdog-verify-") as tmp:
        cache, head_path = Path(tmp) / "features.h5", Path(tmp) / "head.pt"
        # Path 1, cached: extract once, then the real `fit` on the cache.
        t0 = time.perf_counter()
        extract(data_dir, cache, ecfg, only=set(rels), model=model, progress=progress)
        t1 = time.perf_counter()
        fit(cache, head_path, fcfg, curve=False, device=ecfg.device)  # both paths train where extraction ran
        t2 = time.perf_counter()
        cached_head, _ = load_head(head_path)
        # the same fit streamed from disk (two chunks in memory): the batch order must not depend on memory
        streamed = fit(cache, head_path.with_name("streamed.pt"), fcfg, curve=False, budget_bytes=1,
                       device=ecfg.device)
        assert streamed.streamed, "a 1-byte budget streams"
        streamed_diff = max(max_diff(cached_head, load_head(head_path.with_name("streamed.pt"))[0], k)
                            for k in ("weight", "bias"))
        index = read_index(cache)
        x_cached = torch.from_numpy(read_features(cache))  # [N, D]
    labeled_rows(index, cache)
    labels = torch.from_numpy(index.labels.astype(np.int64))  # [N]
    tr, va = (torch.from_numpy(a) for a in split(index.paths, index.labels, fcfg.val_fraction, fcfg.seed))

    # Path 2, end-to-end: decode + preprocess + the frozen backbone for every batch of every epoch.
    through_network = network_features(data_dir, index.paths, model, backbone.preset)
    t3 = time.perf_counter()
    e2e_cfg = fcfg if e2e_seed is None else replace(fcfg, seed=e2e_seed)
    on_epoch = (lambda s: progress("end-to-end epochs", s.epoch, fcfg.epochs)) if progress else None
    e2e_head, _, _ = train(through_network, labels, tr, va, e2e_cfg, on_epoch, in_dim=x_cached.shape[1],
                           device=training_device(ecfg.device), classes=len(index.classes))
    t4 = time.perf_counter()

    c_loss, c_acc, c_logits = evaluate(cached_head, lambda r: x_cached.index_select(0, r), labels, va)
    e_loss, e_acc, e_logits = evaluate(e2e_head, through_network, labels, va)
    c_prob, e_prob = c_logits.softmax(1), e_logits.softmax(1)
    return VerifyReport(
        n_images=len(index.paths), n_val=len(va), epochs=fcfg.epochs,
        max_weight_diff=max_diff(cached_head, e2e_head, "weight"),
        max_bias_diff=max_diff(cached_head, e2e_head, "bias"),
        max_streamed_diff=streamed_diff,
        max_prob_diff=(c_prob - e_prob).abs().max().item() if len(va) else 0.0,
        differing_labels=int((c_prob.argmax(1) != e_prob.argmax(1)).sum()),
        cached_loss=c_loss, e2e_loss=e_loss, cached_acc=c_acc, e2e_acc=e_acc,
        extract_seconds=t1 - t0, fit_seconds=t2 - t1, e2e_seconds=t4 - t3,
        identity_expected=ecfg.dtype == "float32" and ecfg.precision == "fp32", tolerance=tolerance,
    )
