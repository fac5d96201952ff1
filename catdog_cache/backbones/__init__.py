"""The built-in backbone plugins. They are registered through the `catdog_cache.backbones` entry-point group in
pyproject.toml, exactly as a third-party package would register its own (see README, "Backbone plugins")."""

from __future__ import annotations

from . import lite, timm_models, tiny, tvmodels, vgg

BUILTIN = [("vgg16", vgg.plugin), ("efficientnet_lite", lite.plugin), ("tiny", tiny.plugin),
           ("torchvision", tvmodels.plugin), ("timm", timm_models.plugin)]
