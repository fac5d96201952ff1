"""Prove the promise: training the head on cached features equals training it through the frozen network.

Both paths call `fit.train` (one loop) with the same config; only `features_of` differs: a row lookup in the cache
versus a full forward pass of the frozen backbone on the decoded images, every epoch, as the article intended.

The input is anything extract takes. Tar shards: the chosen samples (balanced as for a folder) are read from the shards
once, written to one temporary shard that extract reads through its tar path, and the end-to-end side decodes the
same bytes, held in memory (so keep --limit small on large shards)."""

from __future__ import annotations

import io
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .backbone import Preset
from .cache import CAT_DOG, read_features, read_index
from .engines.dispatch import extract
from .errors import InputError
from .extract.config import ExtractConfig
from .extract.loader import ImageFiles
from .files import printable
from .fit import Features, FitConfig, evaluate, fit, labeled_rows, split, train, training_device
from .fit.head import load_head
from .sources.folder import discover
from .sources.spec import is_tar_input, open_tar, refuse_missing, resolve_inputs
from .sources.tars import key_label, read_samples


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


def tar_subset(shards: list[str], limit: int | None, spec: str) -> list[tuple[int, bytes]]:
    """A tar input's labeled samples as (label, image bytes), balanced as balanced_subset balances a folder: the
    first limit/K of each of the K classes (cat, dog: a `.cls` member, else the key's prefix or class folder) in the
    input's order, the first limit % K classes one more. Shards are streamed in turn, until every class is full."""
    k = len(CAT_DOG)
    want = [None if limit is None else limit // k + (c < limit % k) for c in range(k)]
    picked: list[list[bytes]] = [[] for _ in range(k)]
    seen = 0
    for source in shards:
        if all(w is not None and len(p) >= w for p, w in zip(picked, want, strict=True)):
            break
        try:
            with open_tar(source) as fh:
                for sample in read_samples(fh):
                    seen += 1
                    label = sample.label if sample.label is not None else key_label(sample.key)
                    if sample.data is not None and not sample.reason and label >= 0 and \
                            (want[label] is None or len(picked[label]) < want[label]):
                        picked[label].append(sample.data)
        except OSError as e:
            raise InputError(f"cannot read {printable(source)}: {e.strerror or e}") from None
    if not any(picked):
        raise InputError(f"{printable(spec)} has {seen} samples but none labeled with an image: verify needs labeled "
                         "shards (.cls members 0 cat / 1 dog, or cat.N / dog.N keys)" if seen else
                         f"no images found in {printable(spec)}")
    return [(c, data) for c in range(k) for data in picked[c]]


def write_shard(path: Path, samples: list[tuple[int, bytes]]) -> dict[bytes, bytes]:
    """One tar of the samples, keyed 000000, 000001, ... with a `.cls` member each; returns key -> image bytes."""
    blobs: dict[bytes, bytes] = {}
    with tarfile.open(path, "w") as tf:
        for i, (label, data) in enumerate(samples):
            key = f"{i:06d}"
            blobs[key.encode()] = data
            for name, blob in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):  # decoded by content
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return blobs


def network_features(data_dir: Path | None, paths: list[bytes], model: torch.nn.Module, preset: Preset,
                     blobs: dict[bytes, bytes] | None = None) -> Features:
    """Row indices -> features computed now, from the image files (or the bytes in `blobs`, by row key), through
    the frozen network (no cache), decoded as extract decodes them (ImageFiles)."""
    files = ImageFiles(data_dir, [os.fsdecode(p) for p in paths], ("center",), preset)
    device = next(model.parameters()).device

    def item(i: int) -> torch.Tensor:
        return (files.decode(i, blobs[paths[i]]) if blobs is not None else files[i])[1][0]  # [3, S, S]

    def through_network(rows: torch.Tensor) -> torch.Tensor:
        x = torch.stack([item(int(i)) for i in rows])  # [B, 3, S, S]
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
    """Train the head on the cache and end-to-end through the frozen network, on the same rows, and compare. The
    input: a labeled folder, or labeled tar shards (the module's docstring says how)."""
    if fcfg.epochs is None:  # both paths train a set number of epochs: a stop on the validation loss could differ
        fcfg = replace(fcfg, epochs=3)  # by float rounding (the CLI's default)
    if limit is not None and limit < 4:
        raise InputError(f"--limit must be at least 4, got {limit}")
    if not (math.isfinite(tolerance) and tolerance >= 0):  # nan would make every comparison "disagree: 0 > nan"
        raise InputError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    spec = os.fspath(data_dir)
    shards = resolve_inputs(spec) if is_tar_input(spec) else None
    if shards is not None:
        refuse_missing(shards)
        samples, rels, root = tar_subset(shards, limit, spec), None, None
    else:
        root = Path(spec)
        rels = balanced_subset(root, limit)
    backbone = ecfg.resolve()
    model = backbone.build(ecfg.weights)  # built once, shared: the comparison times training, not loading
    blobs: dict[bytes, bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="catdog-verify-") as tmp:
        cache, head_path = Path(tmp) / "features.h5", Path(tmp) / "head.pt"
        if shards is not None:  # the chosen samples as one shard, read by extract's tar path
            blobs = write_shard(Path(tmp) / "chosen.tar", samples)
        # Path 1, cached: extract once, then the real `fit` on the cache.
        t0 = time.perf_counter()
        if blobs is None:
            extract(root, cache, ecfg, only=set(rels), model=model, progress=progress)
        else:
            extract(Path(tmp) / "chosen.tar", cache, ecfg, model=model, progress=progress)
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
    through_network = network_features(root, index.paths, model, backbone.preset, blobs)
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
