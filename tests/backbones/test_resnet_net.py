"""The ResNets built without torchvision (backbones/resnet_net.py, issue 33's start-up): torchvision's modules,
random init, state dict names, weights and preset, bit for bit; and an extract of resnet18 that never imports it."""

from __future__ import annotations

import os

import pytest
import torch

from catdog_cache.backbone import WeightsSpec, get_backbone
from catdog_cache.backbones import tv_net, tvmodels
from catdog_cache.backbones.loading import seeded
from catdog_cache.backbones.resnet_net import LAYERS, resnet
from catdog_cache.backbones.tv_layers import FINAL, RESNETS
from tests.sources.test_eval_transform import imported_by_extract

torchvision = pytest.importorskip("torchvision", reason="the comparison is with torchvision's own ResNets")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_random_init_names_and_forward_as_torchvision(name):
    ours = seeded(7, lambda: resnet(name)).eval()
    ref = seeded(7, lambda: torchvision.models.get_model(name, weights=None)).eval()
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))
    # the module tree too: what --layer names and hooks would see
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]


def test_the_recorded_weights_and_presets_are_torchvisions():
    assert set(RESNETS) == set(LAYERS)
    for name, rec in RESNETS.items():
        w = torchvision.models.get_model_weights(name).DEFAULT
        t = w.transforms()
        preset, weights, file = tvmodels._default(name)
        assert (weights, rec.url) == (w.name, w.url) and file == os.path.basename(w.url)
        assert (preset.resize, preset.crop, preset.interpolation) == (t.resize_size[0], t.crop_size[0],
                                                                      t.interpolation.value)
        assert list(preset.mean) == list(t.mean) and list(preset.std) == list(t.std)


def test_imagenet_and_file_weights_load_as_torchvision_loads_them(tmp_path, monkeypatch):
    """--weights imagenet reads torchvision's cache file for the recorded URL; --weights FILE a state dict."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = seeded(3, lambda: torchvision.models.resnet18(weights=None)).eval()
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / RESNETS["resnet18"].file
    ckpt.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt)
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = ref(x)
        assert torch.equal(tv_net.make("resnet18", FINAL, WeightsSpec("imagenet")).eval()(x), want)
        assert torch.equal(tv_net.make("resnet18", FINAL, WeightsSpec("file", path=str(ckpt))).eval()(x), want)
    assert get_backbone("resnet18").offline()


def test_a_resnet18_extract_never_imports_torchvision(kaggle_dir, tmp_path):
    imported, output = imported_by_extract(kaggle_dir, tmp_path / "c.h5", "resnet18")
    assert imported == "[]", output
