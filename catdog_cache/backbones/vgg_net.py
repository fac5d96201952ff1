"""The VGG16 plugin's model (torch imported here; the plugin itself, vgg, imports none): VGG16 up to fc7, fc6 or
pool5, with torchvision's ImageNet weights, seeded random ones or a state-dict file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbone import WeightsSpec
from .loading import load_state_file, seeded, torchvision_state_dict, weights_file


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


def make(spec: WeightsSpec, keep: int) -> nn.Module:
    from torchvision.models import VGG16_Weights, vgg16

    if spec.kind == "random":
        return VGGFeatures(seeded(spec.seed, lambda: vgg16(weights=None)), keep)
    with torch.device("meta"):
        vgg = vgg16(weights=None)  # no 2-second random init of weights about to be replaced
    if spec.kind == "imagenet":
        vgg.load_state_dict(torchvision_state_dict(VGG16_Weights.IMAGENET1K_V1, "VGG16", "vgg16"), assign=True)
    else:
        load_state_file(vgg, spec, "torchvision VGG16", ignore=("classifier.6.",))  # fc8 is not used
    model = VGGFeatures(vgg, keep)
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError("VGG16 weights incomplete")
    return model
