"""A 4096-d stand-in with VGG16's contract, for fast tests only (hidden from `catdog-cache backbones`)."""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import IMAGENET, Backbone, WeightsSpec, seeded
from ..errors import InputError


class Tiny(nn.Module):
    """[B, 3, 224, 224] -> [B, 4096], non-negative like fc7 after ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 4 * 4, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))  # [B, 8, 28, 28]
        x = self.pool(x).flatten(1)  # [B, 128]
        return torch.relu(self.fc(x))  # [B, 4096]


def make(spec: WeightsSpec) -> nn.Module:
    if spec.kind != "random":
        raise InputError("--backbone tiny only supports --weights random")
    return seeded(spec.seed, Tiny)


class TinyPlugin:
    def names(self) -> list[str]:
        return []  # test-only: never listed, never the default

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name != "tiny":
            return None
        if (layer or "fc7") not in ("fc7", "classifier.5"):
            raise InputError("--backbone tiny has one layer")
        return Backbone("tiny", "fc7", IMAGENET, make, "none", make_meta=Tiny)


plugin = TinyPlugin()
