"""A 4096-d stand-in with VGG16's contract, for fast tests only (hidden from `catdog-cache backbones`). The
description only: the model (torch) is in tiny_net."""

from __future__ import annotations

from ..backbone import IMAGENET, Backbone, WeightsSpec
from ..errors import InputError
from .loading import seeded


def make(spec: WeightsSpec):
    if spec.kind != "random":
        raise InputError("--backbone tiny only supports --weights random")
    from .tiny_net import Tiny

    return seeded(spec.seed, Tiny)


def make_meta():
    from .tiny_net import Tiny

    return Tiny()


class TinyPlugin:
    def names(self) -> list[str]:
        return []  # test-only: never listed, never the default

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if name != "tiny":
            return None
        if (layer or "fc7") not in ("fc7", "classifier.5"):
            raise InputError("--backbone tiny has one layer")
        # make is looked up when called, so that tests can replace it
        return Backbone("tiny", "fc7", IMAGENET, lambda spec: make(spec), "none", make_meta=make_meta, dim=4096)


plugin = TinyPlugin()
