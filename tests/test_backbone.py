import pytest
import torch

from catdog_cache.backbone import WeightsSpec, build, get_backbone, parse_weights, resolve_device, spec_from_identity
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
    assert spec_from_identity(vgg.identity(spec), str(path)) == spec
    assert spec_from_identity(vgg.identity(spec), recorded_path=str(path)) == spec  # found where it was recorded
    with pytest.raises(InputError, match="pass the same file"):
        spec_from_identity(vgg.identity(spec))
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    with pytest.raises(InputError, match="is not the file the head was trained with"):
        spec_from_identity(vgg.identity(spec), str(other))
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
