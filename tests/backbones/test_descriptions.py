"""The backbone listing: from each plugin's recorded description (no model built), which matches the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from catdog_cache.backbone import get_backbone


def test_backbones_lists_from_descriptions_without_building_models(cli, monkeypatch) -> None:
    from catdog_cache.backbone import Backbone

    def no_model(self, count):
        raise AssertionError(f"{self.name}: a model was built to list it")

    get_backbone.cache_clear()
    monkeypatch.setattr(Backbone, "_meta_pass", no_model)
    rows = json.loads(cli("backbones", "--json").output)
    assert {r["backbone"] for r in rows} >= {"vgg16", "efficientnet_lite0", "resnet50", "vit_b_16"}
    assert all(r["dim"] for r in rows if not r["backbone"].startswith("timm:"))
    get_backbone.cache_clear()


def test_recorded_descriptions_match_the_models() -> None:
    """The sizes the plugins record for the listing are what a meta-device pass of each model gives; the
    torchvision names and weights they record are the installed torchvision's."""
    import torch.hub
    import torchvision
    from torchvision.models import get_model_weights

    from catdog_cache.backbone import Backbone
    from catdog_cache.backbones import tvmodels

    for name, layer in [("vgg16", "fc7"), ("vgg16", "fc6"), ("vgg16", "pool5"), ("efficientnet_lite0", None),
                        ("efficientnet_lite2", None), *[(n, None) for n in tvmodels.LISTED]]:
        b = get_backbone(name, layer)
        dim, gflops = Backbone._meta_pass(b, count=True)
        assert (b.dim, round(b.gflops, 2)) == (dim, pytest.approx(round(gflops, 2), abs=0.01)), name
    for name, listed in tvmodels.LISTED.items():
        weights = get_model_weights(name).DEFAULT
        assert (listed.weights, listed.file) == (weights.name, os.path.basename(weights.url))
    assert tvmodels.classifier_names() == set(torchvision.models.list_models(module=torchvision.models))
    assert tvmodels.hub_dir() == Path(torch.hub.get_dir())  # conftest points TORCH_HOME at the test's folder
