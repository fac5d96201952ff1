"""A third-party backbone plugin, as another package would ship it (used by test_backbone)."""

import torch
from torch import nn

from catdog_cache.backbone import IMAGENET, Backbone, WeightsSpec


class MeanPixel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # [B, 3]: the mean colour, a 3-d "feature"


class Plugin:
    def names(self) -> list[str]:
        return ["meanpix"]

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name != "meanpix":
            return None

        def make(spec: WeightsSpec) -> nn.Module:
            return MeanPixel()

        return Backbone("meanpix", "mean", IMAGENET, make, "none", note="example plugin")


plugin = Plugin()
