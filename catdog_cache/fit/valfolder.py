"""fit --val DIR: a labeled folder of the user's own as the validation set (the PyTorch tutorial's val/, Keras'
validation_data) in place of the hash split. Its features are cached as predict caches a test folder's (score.features:
beside the head, named for the folder and the feature provenance, or at --val-cache; extracted through extract only
when something is missing), with the training cache's own provenance, so a later `predict DIR` with the head reads
them back without a backbone pass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbone import spec_from_identity
from ..cache import Provenance, encode_path, read_index, require_same
from ..errors import InputError, ProvenanceMismatch
from ..extract.config import Progress
from ..files import printable, same_file
from ..score.features import cached_features, default_cache
from ..score.inputs import folder_samples, score_input
from ..score.rows import input_rows
from ..score.scorer import Loaded
from .config import Features


@dataclass
class ValFolder:
    folder: Path  # resolved
    caches: list[Path]  # the folder's features, one cache per training cache
    x: torch.Tensor  # [n, D] the first view of each labeled image, the caches joined side by side
    labels: torch.Tensor  # [n] int64 ids into the training classes
    extracted: int  # images that went through a backbone in this run
    failed: int  # images that could not be decoded (not in x)
    unlabeled: int  # images outside the class folders (not in x)
    paths: list[str] = field(default_factory=list)  # [n] each row's file, for the worst-scored list

    def meta(self) -> dict:
        """What the head records (info, a later reader): the folder, its rows and where its features are."""
        return {"folder": str(self.folder), "rows": len(self.labels), "caches": [str(c.resolve()) for c in self.caches]}


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def val_features(folder: str | os.PathLike[str], caches: list[Path], provenances: list[str],
                 weights_paths: list[str], classes: list[str], sources: list[str], head_path: Path,
                 val_caches: list[Path] | None = None, device: str = "auto", progress: Progress | None = None
                 ) -> ValFolder:
    """The labeled images of `folder` as validation rows for a fit on `caches`. Refused in one line: tar input, an
    unlabeled folder, classes other than the training classes (one more, or one missing), a folder that overlaps a
    training folder (its images would be trained on), features made otherwise than the training cache's."""
    inp = score_input(folder)
    if inp.tars:
        raise InputError(f"--val {printable(inp.spec)}: give a folder with one sub-folder per class (tar shards are "
                         "not taken as a validation set)")
    disc = folder_samples(inp)  # no images: one line
    root = Path(inp.sources[0])
    for s in sources:  # the folders training reads: validating on them would score images it trained on
        if _overlap(root, Path(s)):
            raise InputError(f"--val {printable(str(folder))} overlaps the training folder {printable(s)} (in "
                             f"{printable(str(caches[0]))}): validation images must not be trained on; give a folder "
                             "that was not extracted into the training cache")
    seen = sorted({disc.classes[y] for y in disc.labels.tolist() if y >= 0}) if disc.classes else []
    if not seen:
        raise InputError(f"--val {printable(str(folder))} has no labeled images: give a folder with one sub-folder per "
                         f"class ({', '.join(printable(c) for c in classes)[:200]})")
    extra, missing = [c for c in seen if c not in classes], [c for c in classes if c not in seen]
    if extra or missing:
        what = "; ".join(w for w in (
            f"classes the training cache lacks: {', '.join(printable(c) for c in extra[:5])}" if extra else "",
            f"no images of {', '.join(printable(c) for c in missing[:5])}" if missing else "") if w)
        raise InputError(f"--val {printable(str(folder))} must hold the training classes "
                         f"({', '.join(printable(c) for c in classes)[:200]}) and has {what}")
    members = []
    for text, path, c in zip(provenances, weights_paths, caches, strict=True):
        prov = Provenance.from_json(text, f"--cache {c}")
        members.append((prov, spec_from_identity(prov.weights, recorded_path=path or None)))
    # the scoring side's view of a head not yet trained: its caches and classes, no weights
    loaded = Loaded(None, members[0][0], 0.0, {"caches": [str(c.resolve()) for c in caches]}, members[0][1],
                    members=members, classes=list(classes))
    for i, c in enumerate(caches):  # today's backbone must make the training cache's features
        require_same(members[i][0], loaded.config(member=i).provenance(), f"--cache {c}", "this catdog-cache")
    if val_caches and len(val_caches) != len(caches):
        raise InputError(f"--val-cache: fit needs {len(caches)} validation caches (one per --cache), got "
                         f"{len(val_caches)}")
    planned = val_caches or [default_cache(loaded, head_path, inp, i) for i in range(len(caches))]
    for i, v in enumerate(planned):
        if val_caches and any(same_file(v, c) for c in caches):
            raise InputError(f"--val-cache {v} is a training cache: give the validation features a file of their own")
        if v.is_file():
            diffs = read_index(v).provenance.differences(members[i][0], "it", f"--cache {caches[i]}")
            if diffs:
                raise ProvenanceMismatch(f"--val-cache {v} holds features made differently from the training cache's "
                                         f"({'; '.join(diffs)}): give another --val-cache")
    used, extracted = cached_features(loaded, head_path, inp, planned, device, 0, -1, progress, "val",
                                      explicit=bool(val_caches))
    parts = [input_rows(c, inp, None) for c in used]
    ids = [classes.index(c) if c in classes else -1 for c in disc.classes]
    label = {encode_path(s.rel): ids[s.label] if s.label >= 0 else -1 for s in disc.samples}
    keys = [k for k in parts[0].x if all(k in p.x for p in parts[1:])]
    labeled = [k for k in keys if label.get(k[1], -1) >= 0]
    failed = len({k for p in parts for k, _ in p.failed})
    if not labeled:
        raise InputError(f"--val {printable(str(folder))}: none of its images could be decoded")
    x = np.stack([np.concatenate([p.x[k][0] for p in parts]) for k in labeled])  # [n, sum of D]
    return ValFolder(root, used, torch.from_numpy(x), torch.tensor([label[k[1]] for k in labeled], dtype=torch.long),
                     extracted, failed, sum(1 for k in keys if label.get(k[1], -1) < 0),
                     [os.path.join(root, os.fsdecode(k[1])) for k in labeled])


class WithValidation:
    """Training features (rows [0, offset)) and the validation folder's (rows offset + i), behind one Features: the
    training loop evaluates validation rows through the same callable it trains with. Training batches go to the
    training source unchanged (the same batches, the same head as without --val for the same training rows)."""

    def __init__(self, train: Features, val: torch.Tensor, offset: int) -> None:
        self.train, self.val, self.offset = train, val, offset  # val: [n_val, D] on the host

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.cpu()  # host rows (no .device attribute: batch_source passes host rows)
        is_val = rows >= self.offset  # [B]
        if not bool(is_val.any()):
            return self.train(rows)
        if bool(is_val.all()):
            return torch.index_select(self.val, 0, rows - self.offset)  # [B, D]
        out = torch.empty(len(rows), self.val.shape[1])  # [B, D]: a mixed batch (never drawn by fit itself)
        out[~is_val] = self.train(rows[~is_val]).cpu()
        out[is_val] = torch.index_select(self.val, 0, rows[is_val] - self.offset)
        return out
