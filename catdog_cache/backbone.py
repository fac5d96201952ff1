"""The frozen part: VGG16 features -> avgpool -> flatten -> classifier[0:6] (fc6, ReLU, Dropout, fc7, ReLU, Dropout),
in eval mode so both Dropouts are identity. Weights: imagenet | random (seeded) | a local state-dict file."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, WeightsUnavailable

FEATURE_DIM = 4096
LAYER = "classifier.5"  # output of classifier[0:6]: fc7 after ReLU (and an eval-mode Dropout)
ARCHS = ("vgg16", "tiny")  # "tiny": a 4096-d stand-in for fast tests only; never the default


@dataclass(frozen=True)
class WeightsSpec:
    kind: str  # "imagenet" | "random" | "file"
    seed: int = 0
    path: str = ""
    sha256: str = ""

    @property
    def identity(self) -> str:
        """What provenance records and compares: same identity, same features."""
        if self.kind == "imagenet":
            return "imagenet:IMAGENET1K_V1"
        if self.kind == "random":
            return f"random:seed={self.seed}"
        return f"file:sha256={self.sha256}"


def parse_weights(value: str, seed: int = 0) -> WeightsSpec:
    """`imagenet`, `random` or a path to a torchvision-compatible VGG16 state dict."""
    if value == "imagenet":
        return WeightsSpec("imagenet")
    if value == "random":
        return WeightsSpec("random", seed=seed)
    path = Path(value)
    if not path.is_file():
        raise InputError(f"--weights: expected imagenet, random or a file, and no file exists at {value}")
    return WeightsSpec("file", path=str(path.resolve()), sha256=file_sha256(path))


def spec_from_identity(identity: str, weights_file: str | None = None, need_file: bool = True) -> WeightsSpec:
    """Rebuild a WeightsSpec from recorded provenance (predict must use exactly the extractor the head saw).
    need_file=False: only the identity is wanted (an exported model carries its own weights)."""
    kind, _, rest = identity.partition(":")
    if kind == "imagenet":
        return WeightsSpec("imagenet")
    if kind == "random":
        return WeightsSpec("random", seed=int(rest.split("=", 1)[1]))
    want = rest.split("=", 1)[1]
    if not need_file:
        return WeightsSpec("file", sha256=want)
    if not weights_file:
        raise InputError(f"the head was trained on features from a weights file (sha256 {want[:12]}…): "
                         "pass the same file with --weights FILE")
    spec = parse_weights(weights_file)
    if spec.sha256 != want:
        raise InputError(f"--weights {weights_file}: sha256 {spec.sha256[:12]}… is not the file the head was "
                         f"trained with ({want[:12]}…)")
    return spec


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Fc7(nn.Module):
    """VGG16 up to fc7: [B, 3, 224, 224] -> [B, 4096]."""

    def __init__(self, vgg: nn.Module) -> None:
        super().__init__()
        self.features = vgg.features
        self.avgpool = vgg.avgpool
        self.classifier = vgg.classifier[:6]  # keeps the names classifier.0 / classifier.3 of the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, 512, 7, 7]
        x = self.avgpool(x)  # [B, 512, 7, 7]
        x = torch.flatten(x, 1)  # [B, 25088]
        return self.classifier(x)  # [B, 4096]


class Tiny(nn.Module):
    """Test stand-in with the same contract: [B, 3, 224, 224] -> [B, 4096], non-negative like fc7 after ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 4 * 4, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))  # [B, 8, 28, 28]
        x = self.pool(x).flatten(1)  # [B, 128]
        return torch.relu(self.fc(x))  # [B, 4096]


def imagenet_weights_path() -> Path:
    """Where torchvision's weights cache keeps the VGG16 ImageNet file."""
    from torchvision.models import VGG16_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline: URLError, socket errors, a partial download...
        raise WeightsUnavailable(
            f"VGG16 ImageNet weights are not cached and could not be downloaded ({type(e).__name__}): "
            f"put {weights.url.rsplit('/', 1)[1]} in {imagenet_weights_path().parent}/ or pass --weights FILE "
            "(or --weights random for an offline try-out)"
        ) from None


def build(spec: WeightsSpec, arch: str = "vgg16") -> nn.Module:
    """The frozen extractor on the CPU, eval mode, no gradients."""
    if arch not in ARCHS:
        raise InputError(f"--arch: unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    if arch == "tiny":
        if spec.kind != "random":
            raise InputError("--arch tiny only supports --weights random")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model: nn.Module = Tiny()
        return _freeze(model)

    from torchvision.models import vgg16

    if spec.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)  # "random" weights: identical for a given seed and torch version
            vgg = vgg16(weights=None)
        return _freeze(Fc7(vgg))
    with torch.device("meta"):
        vgg = vgg16(weights=None)  # no 2-second random init of weights about to be replaced
    if spec.kind == "imagenet":
        vgg.load_state_dict(_imagenet_state_dict(), assign=True)
    else:
        try:
            state = torch.load(spec.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"--weights {spec.path}: not a loadable PyTorch state dict ({e})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            missing, unexpected = vgg.load_state_dict(state, strict=False, assign=True)
        except (RuntimeError, TypeError, AttributeError) as e:  # wrong shapes, not a mapping of tensors
            raise InputError(f"--weights {spec.path}: not a torchvision VGG16 state dict "
                             f"({str(e).splitlines()[-1].strip()})") from None
        needed = [k for k in missing if not k.startswith("classifier.6.")]  # fc8 is not used
        if needed or unexpected:
            raise InputError(
                f"--weights {spec.path}: not a torchvision VGG16 state dict "
                f"(missing {needed[:3]}, unexpected {list(unexpected)[:3]})"
            )
    return _freeze(Fc7(vgg))


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"--device: expected auto, cpu or cuda, got {device!r}")
    return torch.device(device)
