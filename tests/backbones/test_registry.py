"""Backbones by name: weights files and their identity, torchvision and timm models, plugins, typos."""

import json

import pytest
import torch

from catdog_cache.backbone import (
    WeightsSpec,
    build,
    get_backbone,
    locate,
    parse_weights,
    resolve_device,
    spec_from_identity,
)
from catdog_cache.errors import InputError


def test_weights_file_round_trip_and_identity(tmp_path):
    """A torchvision VGG16 state dict on disk gives the same extractor; its sha256 is its identity."""
    from torchvision.models import vgg16

    torch.manual_seed(5)
    ref = vgg16().eval()
    path = tmp_path / "vgg16.pth"
    torch.save(ref.state_dict(), path)
    spec = parse_weights(str(path))
    vgg = get_backbone("vgg16")
    assert spec.kind == "file" and vgg.identity(spec) == f"file:sha256={spec.sha256}" and len(spec.sha256) == 64
    model = build(spec)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.classifier[:6](torch.flatten(ref.avgpool(ref.features(x)), 1)))
    recorded = spec_from_identity(vgg.identity(spec))
    assert recorded.sha256 == spec.sha256 and not recorded.path  # the file is only read when images need it
    assert locate(spec_from_identity(vgg.identity(spec), str(path))) == spec
    assert locate(spec_from_identity(vgg.identity(spec), recorded_path=str(path))) == spec  # where it was recorded
    with pytest.raises(InputError, match="pass the same file"):
        locate(recorded)
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    with pytest.raises(InputError, match="is not the file the head was trained with"):
        locate(spec_from_identity(vgg.identity(spec), str(other)))
    with pytest.raises(InputError, match="not a torchvision VGG16 state dict"):
        build(parse_weights(str(other)))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a loadable"):
        build(parse_weights(str(tmp_path / "junk.pth")))


def test_random_weights_are_seeded_and_do_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a, b = build(WeightsSpec("random", seed=1), "tiny"), build(WeightsSpec("random", seed=1), "tiny")
    assert torch.rand(1) == before  # the global stream is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build(WeightsSpec("random", seed=2), "tiny")
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="--backbone 'resnet': unknown"):
        build(WeightsSpec("random"), "resnet")
    with pytest.raises(InputError, match="--device"):
        resolve_device("gpu")


def seeded_torchvision(name: str, seed: int):
    from torchvision.models import get_model

    torch.manual_seed(seed)
    return get_model(name, weights=None).eval()


def test_non_vgg_torchvision_features_equal_plain_torchvision():
    """mobilenet_v3_small: our features are the input of its final Linear, computed by torchvision's own model."""
    ref = seeded_torchvision("mobilenet_v3_small", 3)
    ref.classifier[3] = torch.nn.Identity()  # the final classification Linear
    ours = build(WeightsSpec("random", seed=3), "mobilenet_v3_small")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    b = get_backbone("mobilenet_v3_small")
    assert b.dim == 1024 and b.layer == "logits-input" and 0.05 < b.gflops < 0.2


def test_vgg16_pool5_and_fc6_equal_plain_torchvision():
    ref = seeded_torchvision("vgg16", 4)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pool5 = torch.flatten(ref.avgpool(ref.features(x)), 1)  # [1, 25088]
        torch.testing.assert_close(build(WeightsSpec("random", seed=4), "vgg16", "pool5")(x), pool5, rtol=0, atol=0)
        torch.testing.assert_close(build(WeightsSpec("random", seed=4), "vgg16", "fc6")(x), ref.classifier[:2](pool5))
    assert get_backbone("vgg16", "pool5").dim == 25088 and get_backbone("vgg16").layer == "fc7"
    with pytest.raises(InputError, match="fc7, fc6, pool5"):
        get_backbone("vgg16", "fc9")


def test_graph_node_layer_of_a_torchvision_model():
    b = get_backbone("mobilenet_v3_small", "avgpool")
    ref = seeded_torchvision("mobilenet_v3_small", 5)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = torch.flatten(ref.avgpool(ref.features(x)), 1)  # [2, 576]
        torch.testing.assert_close(b.build(WeightsSpec("random", seed=5))(x), want, rtol=0, atol=0)
    assert b.dim == 576
    with pytest.raises(InputError, match="not a graph node"):
        get_backbone("mobilenet_v3_small", "nowhere").dim  # noqa: B018


def test_weights_file_for_a_torchvision_model(tmp_path):
    ref = seeded_torchvision("mobilenet_v3_small", 6)
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    ours = build(parse_weights(str(tmp_path / "m.pth")), "mobilenet_v3_small")
    ref.classifier[3] = torch.nn.Identity()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(InputError, match="not a torchvision resnet18 state dict"):
        build(parse_weights(str(tmp_path / "m.pth")), "resnet18")


def test_timm_backbone_offline_with_a_weights_file(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    b = get_backbone("timm:resnet10t")
    assert b.dim == 512 and b.preset.crop > 0 and b.preset.resize >= b.preset.crop
    model = timm.create_model("resnet10t", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "t.pth")
    ours = build(parse_weights(str(tmp_path / "t.pth")), "timm:resnet10t")
    model.reset_classifier(0)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model.eval()(x))
    with pytest.raises(InputError, match="timm has no model"):
        get_backbone("timm:no_such_net")


def test_efficientnet_lite_weights_are_packaged():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the [lite] extra is not installed")
    b = get_backbone("efficientnet_lite0")
    assert b.offline() and b.dim == 1280 and b.preset.mean == (0.5, 0.5, 0.5) and b.preset.crop == 224
    assert get_backbone("efficientnet_lite2").preset.crop == 260
    model = b.build(WeightsSpec("imagenet"))
    assert b.identity(WeightsSpec("imagenet")) == "imagenet:efficientnet-lite0-57934424"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_a_third_party_plugin_registers_through_the_entry_point_group(monkeypatch, cli, kaggle_dir):
    """The hook a package uses to add a backbone: an entry point in group catdog_cache.backbones."""
    from importlib.metadata import EntryPoint

    from catdog_cache import backbone as bb

    real = bb.entry_points(group=bb.GROUP)
    fake = EntryPoint(name="plugin_example", value="tests.plugin_example:plugin", group=bb.GROUP)
    monkeypatch.setattr(bb, "entry_points", lambda group: [*real, fake])
    bb.plugins.cache_clear()
    bb.get_backbone.cache_clear()
    try:
        assert [n for n, _ in bb.plugins()][-1] == "plugin_example"
        listed = {row["backbone"]: row for row in json.loads(cli("backbones", "--json").output)}
        assert {"meanpix", "vgg16", "efficientnet_lite0", "resnet50", "timm:NAME"} <= set(listed)
        assert listed["meanpix"]["dim"] == 3 and listed["vgg16"]["dim"] == 4096
        cli("extract", kaggle_dir, "--backbone", "meanpix", "--weights", "random", "--workers", "0")
        from catdog_cache.cache import read_index

        idx = read_index("cache/features.h5")
        assert idx.shape[1:] == (1, 3) and idx.provenance.arch == "meanpix"
    finally:
        bb.plugins.cache_clear()
        bb.get_backbone.cache_clear()


def test_mixing_backbones_in_one_cache_is_refused_with_the_matching_flags(cli, kaggle_dir):
    cli("extract", kaggle_dir, "--backbone", "tiny", "--weights", "random", "--seed", "2")
    r = cli("extract", kaggle_dir, "--backbone", "mobilenet_v3_small", "--weights", "random", ok=False)
    out = " ".join(r.output.split())
    assert r.exit_code == 1 and "arch: the cache has tiny, this extract has mobilenet_v3_small" in out
    assert "transform:" not in out  # what follows from another backbone is not listed
    assert "cache/mobilenet_v3_small-logits-input.h5" in out  # a new file for these settings, first
    assert "--backbone tiny" in out and "--weights random --seed 2" in out  # or the cache's own options


def test_typos_and_wrong_files_get_a_hint(cli, kaggle_dir, tmp_path):
    r = cli("extract", kaggle_dir, "--backbone", "efficentnet_lite0", ok=False)
    assert r.exit_code == 1 and "Did you mean efficientnet_lite0?" in r.output
    r = cli("extract", tmp_path, *["--backbone", "tiny", "--weights", "random"], ok=False)
    assert r.exit_code == 1 and "sub-folders" in r.output and "kaggle" in r.output
    cli("extract", kaggle_dir, "--backbone", "tiny", "--weights", "random")
    r = cli("predict", kaggle_dir, "--head", "cache/features.h5", ok=False)
    assert r.exit_code == 1 and "is a feature cache, not a head" in r.output
