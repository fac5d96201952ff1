"""VGG16, the article's network and the default: fc7 (4096-d, after ReLU), fc6 (4096-d, after ReLU) or pool5
(25,088-d: features -> avgpool -> flatten), with torchvision's weights and eval preset."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbone import IMAGENET, Backbone, WeightsSpec, load_state_file, missing_weights, seeded
from .tvmodels import weights_file

LAYERS = {"fc7": 6, "fc6": 3, "pool5": 0}  # how many classifier modules to keep (ReLU included, Dropout is eval)
ALIASES = {"classifier.5": "fc7"}  # the name schema-1 caches recorded for fc7


class VGGFeatures(nn.Module):
    """VGG16 up to a layer: [B, 3, 224, 224] -> [B, 4096] (fc6, fc7) or [B, 25088] (pool5)."""

    def __init__(self, vgg: nn.Module, keep: int) -> None:
        super().__init__()
        self.features = vgg.features
        self.avgpool = vgg.avgpool
        self.classifier = vgg.classifier[:keep]  # keeps the names classifier.0 / classifier.3 of the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, 512, 7, 7]
        x = self.avgpool(x)  # [B, 512, 7, 7]
        x = torch.flatten(x, 1)  # [B, 25088]
        return self.classifier(x)  # [B, 4096] for fc6/fc7


def imagenet_weights_path() -> Path:
    """Where torchvision's weights cache keeps the VGG16 ImageNet file."""
    from torchvision.models import VGG16_Weights

    return weights_file(VGG16_Weights.IMAGENET1K_V1)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception:  # offline: URLError, socket errors, a partial download...
        raise missing_weights("VGG16", weights.url.rsplit("/", 1)[1], imagenet_weights_path().parent) from None


def make(spec: WeightsSpec, keep: int) -> nn.Module:
    from torchvision.models import vgg16

    if spec.kind == "random":
        return VGGFeatures(seeded(spec.seed, lambda: vgg16(weights=None)), keep)
    with torch.device("meta"):
        vgg = vgg16(weights=None)  # no 2-second random init of weights about to be replaced
    if spec.kind == "imagenet":
        vgg.load_state_dict(_imagenet_state_dict(), assign=True)
    else:
        load_state_file(vgg, spec, "torchvision VGG16", ignore=("classifier.6.",))  # fc8 is not used
    model = VGGFeatures(vgg, keep)
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError("VGG16 weights incomplete")
    return model


class VGGPlugin:
    def names(self) -> list[str]:
        return ["vgg16"]

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name != "vgg16":
            return None
        layer = ALIASES.get(layer or "fc7", layer or "fc7")
        if layer not in LAYERS:
            return None if "." in layer or "_" in layer else _unknown_layer(layer)  # graph nodes: torchvision plugin
        keep = LAYERS[layer]
        return Backbone("vgg16", layer, IMAGENET, lambda spec: make(spec, keep), "IMAGENET1K_V1",
                        offline=lambda: imagenet_weights_path().is_file(),
                        note="the article's network; layers fc7 (default), fc6, pool5",
                        make_meta=lambda: VGGFeatures(__import__("torchvision").models.vgg16(), keep))


def _unknown_layer(layer: str) -> Backbone:
    from ..errors import InputError

    raise InputError(f"--layer {layer!r}: VGG16 layers are fc7, fc6, pool5, or a torchvision graph node name "
                     "(e.g. features.29)")


plugin = VGGPlugin()
