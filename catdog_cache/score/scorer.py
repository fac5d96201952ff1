"""The head as a scorer: loaded from its provenance (with or without its frozen backbone), exported as one
torch.export file, and loaded back from such a file only after checking that nothing in it would be unpickled.

The scorer (frozen backbone + storage-dtype rounding + head + temperature) is one module: `predict --model` and
plain PyTorch run the exported program; `predict` on folders scores cached features with the head alone."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbone import Preset, WeightsSpec, spec_from_identity
from ..cache import Provenance, require_same
from ..cache.format import CAT_DOG
from ..errors import CacheError, InputError
from ..extract.config import ExtractConfig
from ..files import check_outputs, printable, stored_zip, temp_beside
from ..fit.head import Head, check_classes, load_head
from ..sources.decode import decoder_of


class Scorer(nn.Module):
    """[B, 3, S, S] normalised images -> [B, K] calibrated probabilities, one per class (cat, dog for two)."""

    def __init__(self, backbone: nn.Module, head: Head, dtype: str, temperature: float) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.half = dtype == "float16"
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x).float()  # [B, D]; only the backbone may run under --precision's autocast
        if self.half:
            f = f.half().float()  # the head must see exactly what the cache stored
        with torch.autocast(f.device.type, enabled=False):  # head and softmax in fp32, as fit computed them
            return (self.head(f) / self.temperature).softmax(1)  # [B, K]


@dataclass
class Loaded:
    scorer: nn.Module | None  # backbone + head; None until built (cached features need no backbone)
    provenance: Provenance
    clip: float
    meta: dict[str, Any]
    spec: WeightsSpec  # the weights identity the scorer was built from
    head: Head | None = None
    temperature: float = 1.0
    members: list[tuple[Provenance, WeightsSpec]] = field(default_factory=list)  # an ensemble's backbones
    classes: list[str] = field(default_factory=lambda: list(CAT_DOG))  # output i is the probability of classes[i]

    @property
    def crop(self) -> int:
        return Preset.from_spec(self.provenance.transform).crop

    def build_scorer(self) -> nn.Module:
        if len(self.members) > 1:
            raise InputError("this head joins the features of several backbones (an ensemble): it scores cached "
                             "features with `predict` but cannot be exported or run as one network")
        described = self.config().resolve()
        if self.head is not None and self.head.in_dim != described.dim:  # checked before tracing: one line
            raise CacheError(f"the head takes {self.head.in_dim}-d features, but its provenance ({described.name} "
                             f"{described.layer}) makes {described.dim}-d ones; damaged or crafted")
        backbone = described.build(self.spec)
        return Scorer(backbone, self.head, self.provenance.dtype, self.temperature).eval()

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Cached features [N, D] (already rounded to the cache's dtype) -> [N, K] calibrated probabilities."""
        with torch.no_grad():
            return (self.head(x) / self.temperature).softmax(1)  # [N, K]

    def config(self, device: str = "auto", batch_size: int = 0, workers: int = -1,
               views: tuple[str, ...] | None = None, member: int = 0) -> ExtractConfig:
        """The extraction settings the scorer expects (views: the head's, unless narrowed); member: which backbone
        of an ensemble."""
        prov, spec = self.members[member] if self.members else (self.provenance, self.spec)
        return ExtractConfig(weights=spec, backbone=prov.arch, layer=prov.layer, device=device,
                             batch_size=batch_size, workers=workers, dtype=prov.dtype, precision=prov.precision,
                             views=views or tuple(prov.views.split(",")),
                             decoder=decoder_of(prov.transform))


def checked(prov: Provenance, where: str) -> Provenance:
    """A recorded provenance whose transform is a sane preset (an export's is used as recorded, with no plugin to
    compare it with)."""
    try:
        Preset.from_spec(prov.transform)
    except ValueError as e:
        raise CacheError(f"{where}: the recorded transform is invalid ({printable(str(e))}); damaged or crafted"
                         ) from None
    return prov


def load_scorer(head_path: str | os.PathLike[str], weights_file: str | None = None, backbone: bool = True
                ) -> Loaded:
    """The head, and (backbone=True) the frozen network it was trained behind, rebuilt from its provenance.
    backbone=False: only what scoring cached features needs; the backbone is built later if images need it."""
    head, meta = load_head(head_path)
    ensemble = meta.get("ensemble") if isinstance(meta.get("ensemble"), list) else []
    recorded = meta.get("weights_paths") if isinstance(meta.get("weights_paths"), list) else [meta.get("weights_path")]
    members = []
    for i, text in enumerate(ensemble or [meta["provenance"]]):
        prov = checked(Provenance.from_json(text, f"head {head_path}"), f"head {head_path}")
        path = recorded[i] if i < len(recorded) and isinstance(recorded[i], str) and recorded[i] else None
        members.append((prov, spec_from_identity(prov.weights, weights_file, recorded_path=path)))
    prov, spec = members[0]
    if weights_file and all(sp.kind != "file" for _, sp in members):
        raise InputError(f"--weights {weights_file}: the head was trained on {prov.weights} features, not a weights "
                         "file; drop --weights")
    loaded = Loaded(None, prov, float(meta.get("clip", 0.0)), meta, spec, head, float(meta.get("temperature", 1.0)),
                    members, meta["classes"])  # load_head checked the class names
    for i, (member, _) in enumerate(members):  # a changed transform or backbone definition
        require_same(member, loaded.config(member=i).provenance(), f"head {head_path}", "this catdog-cache")
    if backbone:
        loaded.scorer = loaded.build_scorer()
    return loaded


EXPORT_FORMAT = 1


def export(head_path: str | os.PathLike[str], out: str | os.PathLike[str], weights_file: str | None = None) -> Path:
    """One file: the scorer as a torch.export program, with its provenance, temperature and clip as an extra file.
    Plain PyTorch runs it: `torch.export.load(path).module()(x)`, x: [B, 3, S, S] after the recorded transform,
    output [B, K] probabilities, one per class, in the order of the metadata's "classes"."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise InputError(f"--out {out}: torch.export archives are named *.pt2")
    check_outputs({"--out": out}, {"--head": Path(head_path)})
    loaded = load_scorer(head_path, weights_file)
    example = (torch.zeros(2, 3, loaded.crop, loaded.crop),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(loaded.scorer, example, dynamic_shapes={"x": {0: batch}})
    extra = {"catdog_cache.json": json.dumps({"format": EXPORT_FORMAT, "provenance": json.loads(
        loaded.provenance.to_json()), "clip": loaded.clip, "temperature": loaded.temperature,
        "classes": loaded.classes})}
    with temp_beside(out, suffix=".pt2") as tmp:
        try:
            with warnings.catch_warnings():  # torch's note on weights that share storage: harmless for a CPU export
                warnings.filterwarnings("ignore", message="No complete tensor found in the group")
                torch.export.save(program, tmp, extra_files=extra)
        except RuntimeError as e:  # torch reports a full disk as a RuntimeError with a C++ trace
            raise OSError(errno.ENOSPC if "space" in str(e).lower() else errno.EIO, str(e).splitlines()[0]) from None
    return out


MAX_MODEL_BYTES = 4 * 2**30
_MEMBER = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                     r"models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+|"
                     r"data/constants/model_constants_config\.json|data/constants/tensor_\d+|"
                     r"data/sample_inputs/model\.pt|extra/catdog_cache\.json)")


def check_archive(path: Path) -> dict[str, Any]:
    """Refuse any .pt2 that torch.export.load would unpickle from: torch falls back to pickle (arbitrary code) for
    weights or constants marked use_pickle, legacy weight files, custom objects and sample inputs that the safe
    loader rejects. Only the members our export writes are allowed, stored uncompressed within the file's size,
    each once; every tensor must be raw bytes, and the sample inputs must load with weights_only=True. Members are
    read through torch's own zip reader (the one torch.export.load uses), so the bytes checked are the bytes loaded."""
    try:
        reader = stored_zip(path, MAX_MODEL_BYTES)
        names = reader.get_all_records()  # without the top folder, as torch's loader names them
        bad = [n for n in names if not _MEMBER.fullmatch(n)]
        if bad:
            raise ValueError(f"unexpected member {bad[0]!r}")

        def config(name: str) -> dict[str, Any]:
            return json.loads(reader.get_record(name)).get("config", {}) if name in names else {}

        for entry in [*config("data/weights/model_weights_config.json").values(),
                      *config("data/constants/model_constants_config.json").values()]:
            if entry.get("use_pickle") is not False or not str(entry.get("path_name", "")).startswith(
                    ("weight_", "tensor_")):
                raise ValueError("a pickled tensor")
        if "data/sample_inputs/model.pt" in names:
            try:  # torch retries unsafely if this fails
                torch.load(io.BytesIO(reader.get_record("data/sample_inputs/model.pt")), weights_only=True)
            except Exception:
                raise ValueError("sample inputs that only load by unpickling") from None
        info = json.loads(reader.get_record("extra/catdog_cache.json"))
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"--model {path} is not a model exported by `catdog-cache export` ({printable(str(e))}); "
                         "refusing to load it") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise CacheError(f"--model {path} has no catdog-cache export metadata: refusing it")
    return info


def load_exported(path: str | os.PathLike[str]) -> Loaded:
    """A .pt2 from `catdog-cache export`, checked before torch sees it (see check_archive). Only load files you
    or a trusted pipeline exported: the archive is checked, but its graph runs as given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--model {path}: no such file (make one with `catdog-cache export`)")
    if path.suffix != ".pt2":
        raise InputError(f"--model {path}: expected a *.pt2 file from `catdog-cache export`")
    info = check_archive(path)
    prov = checked(Provenance.from_json(json.dumps(info.get("provenance")), f"--model {path}"), f"--model {path}")
    clip = info.get("clip")
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 <= clip < 0.5:
        raise CacheError(f"--model {path}: clip {clip!r} is not in [0, 0.5); refusing it")
    try:
        program = torch.export.load(path)
        example = program.example_inputs[0][0].shape  # [2, 3, S, S]: the program accepts only this crop
        module = program.module()
    except Exception as e:
        raise CacheError(f"{path} is not a model exported by `catdog-cache export` ({type(e).__name__})") from None
    crop = Preset.from_spec(prov.transform).crop
    if tuple(example[1:]) != (3, crop, crop):
        raise CacheError(f"--model {path}: the recorded transform crops to {crop} px but the program takes "
                         f"{tuple(example[1:])}; damaged or crafted")
    classes = check_classes(info.get("classes"), path)
    return Loaded(module, prov, float(clip), info, spec_from_identity(prov.weights), classes=classes)
