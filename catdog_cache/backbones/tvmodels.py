"""Any torchvision classification model, spelled as torchvision spells it (resnet50, convnext_tiny, vit_b_16...).
Features: the input of its final classification Linear (the layer is replaced by Identity), or any graph node
given with --layer (torchvision.models.feature_extraction), flattened. Weights and eval preset: torchvision's
DEFAULT weights for that model.

This module is the plugin's description and imports no torch: names are read from torchvision's source, the
listed models' sizes are recorded below, and the model itself is built by tv_net (torch) only when needed."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..backbone import IMAGENET, Backbone, Preset, WeightsSpec
from .tv_layers import FINAL, RESNETS


@dataclass(frozen=True)
class Listed:
    """What `catdog-cache backbones` shows of a model, as torchvision 0.29 defines it (a test compares these with
    the installed torchvision): features at FINAL, GFLOP per image, the DEFAULT weights and their file."""

    dim: int
    gflops: float
    weights: str
    file: str


LISTED = {
    "resnet50": Listed(2048, 8.174, RESNETS["resnet50"].weights, RESNETS["resnet50"].file),
    "convnext_tiny": Listed(768, 8.910, "IMAGENET1K_V1", "convnext_tiny-983f1562.pth"),
    "efficientnet_v2_s": Listed(1280, 16.73, "IMAGENET1K_V1", "efficientnet_v2_s-dd5fe13b.pth"),
    "vit_b_16": Listed(768, 35.13, "IMAGENET1K_V1", "vit_b_16-c867db91.pth"),
}
REGISTERED = re.compile(r"@register_model\([^)]*\)\s*\n(?:[ \t]*@.*\n)*[ \t]*def\s+(\w+)")


@functools.cache
def classifier_names() -> frozenset[str]:
    """torchvision's classification models (list_models(module=torchvision.models)), read from the `@register_model()`
    lines of its source rather than by importing it: torchvision imports torch, and an unknown --backbone should
    be reported at once. Falls back to the import if torchvision's source reads differently."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()  # no torchvision: no torchvision models (extract will say what is missing)
    names: set[str] = set()
    for folder in spec.submodule_search_locations:
        for source in sorted((Path(folder) / "models").glob("*.py")):  # not subfolders: detection, video...
            try:
                names.update(REGISTERED.findall(source.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError):
                names.clear()
                break
    if len(names) < 10:  # not the layout this was written for
        import torchvision

        return frozenset(torchvision.models.list_models(module=torchvision.models))
    return frozenset(names)


def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else
    ~/.cache/torch/hub (torch.hub's own rule; a test compares them)."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub"


def checkpoint_path(file: str) -> Path:
    """Where torchvision's weights cache keeps a weights file."""
    return hub_dir() / "checkpoints" / file


@functools.cache
def _default(name: str) -> tuple[Preset, str, str]:
    """The DEFAULT weights' eval preset, name and file: recorded for the ResNets, else from torchvision itself
    (imports torch and torch._dynamo)."""
    if name in RESNETS:
        r = RESNETS[name]
        return Preset(r.resize, 224, IMAGENET.mean, IMAGENET.std, "bilinear"), r.weights, r.file
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    t = weights.transforms()
    preset = Preset(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std), t.interpolation.value)
    return preset, weights.name, os.path.basename(weights.url)


def _offline(name: str) -> bool:
    file = LISTED[name].file if name in LISTED else _default(name)[2]
    return checkpoint_path(file).is_file()


def make(name: str, layer: str, spec: WeightsSpec):
    from .tv_net import make

    return make(name, layer, spec)


def make_meta(name: str, layer: str):
    from .tv_net import make_meta

    return make_meta(name, layer)


class TorchvisionPlugin:
    SHOWN = list(LISTED)  # listed; any classifier resolves

    def names(self) -> list[str]:
        return self.SHOWN

    def all_names(self) -> list[str]:
        return sorted(classifier_names())

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name not in classifier_names():
            return None
        layer = layer or FINAL
        listed = LISTED.get(name) if layer == FINAL else None
        # preset and weights identity always come from the installed torchvision (they are provenance); only the
        # listing's numbers are recorded
        return Backbone(name, layer, lambda: _default(name)[0], lambda spec: make(name, layer, spec),
                        lambda: _default(name)[1], offline=lambda: _offline(name),
                        note=f"torchvision, weights {listed.weights}" if listed else "torchvision, DEFAULT weights",
                        make_meta=lambda: make_meta(name, layer), dim=listed.dim if listed else None,
                        gflops=listed.gflops if listed else None)


plugin = TorchvisionPlugin()
