"""VGG16, the article's network and the default: fc7 (4096-d, after ReLU), fc6 (4096-d, after ReLU) or pool5
(25,088-d: features -> avgpool -> flatten), with torchvision's weights and eval preset. The description only: the
model (torch) is in vgg_net, imported when it is built."""

from __future__ import annotations

from ..backbone import IMAGENET, Backbone, WeightsSpec
from ..errors import InputError
from .tvmodels import checkpoint_path

LAYERS = {"fc7": 6, "fc6": 3, "pool5": 0}  # how many classifier modules to keep (ReLU included, Dropout is eval)
ALIASES = {"classifier.5": "fc7"}  # the name schema-1 caches recorded for fc7
# Feature size and GFLOP per image (a meta-device pass computes them; a test checks they still agree)
SIZES = {"fc7": (4096, 30.93), "fc6": (4096, 30.90), "pool5": (25088, 30.69)}
IMAGENET_FILE = "vgg16-397923af.pth"  # VGG16_Weights.IMAGENET1K_V1's file in torchvision's weights cache


def make(spec: WeightsSpec, keep: int):
    from .vgg_net import make

    return make(spec, keep)


def make_meta(keep: int):
    from torchvision.models import vgg16

    from .vgg_net import VGGFeatures

    return VGGFeatures(vgg16(), keep)


class VGGPlugin:
    def names(self) -> list[str]:
        return ["vgg16"]

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name != "vgg16":
            return None
        layer = ALIASES.get(layer or "fc7", layer or "fc7")
        if layer not in LAYERS:
            if "." in layer or "_" in layer:
                return None  # a graph node: the torchvision plugin's
            raise InputError(f"--layer {layer!r}: VGG16 layers are fc7, fc6, pool5, or a torchvision graph node name "
                             "(e.g. features.29)")
        keep = LAYERS[layer]
        dim, gflops = SIZES[layer]
        return Backbone("vgg16", layer, IMAGENET, lambda spec: make(spec, keep), "IMAGENET1K_V1",
                        offline=lambda: checkpoint_path(IMAGENET_FILE).is_file(),
                        note="the article's network; layers fc7 (default), fc6, pool5",
                        make_meta=lambda: make_meta(keep), dim=dim, gflops=gflops)


plugin = VGGPlugin()
