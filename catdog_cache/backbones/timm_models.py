"""timm:NAME when timm is installed: pooled features (num_classes=0) with timm's own data config. Pretrained
weights come from timm's hub (the Hugging Face Hub) and its cache; --weights FILE works offline. timm (and torch)
are imported only for a timm:NAME backbone, when it is resolved.

Offline, huggingface_hub retries each download five times with back-off (about a minute, some twenty log lines)
before it fails: a short probe of the hub first, and when it does not answer, the download runs in the hub
library's offline mode, which reads its cache (weights downloaded before still load) and fails at once otherwise."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..backbone import Backbone, Preset, WeightsSpec
from ..errors import InputError, WeightsUnavailable
from .loading import hub_reachable, load_state_file, offline_alternative, seeded

if TYPE_CHECKING:
    from torch import nn


def _timm():
    try:
        import timm
    except ImportError:
        raise InputError("--backbone timm:NAME needs timm: pip install timm") from None
    return timm


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE, read once at its import) for the calls inside: cached files
    only, no request and no retry."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def pretrained(timm, name: str) -> nn.Module:
    """timm's pretrained model, from the hub's cache when the hub is out of reach (one line, at once, if not there)."""
    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT
    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    try:
        with hub_offline(offline):
            return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{host} cannot be reached") if offline \
            else f"the download from {host} failed ({type(e).__name__})"
        raise WeightsUnavailable(
            f"timm:{name} pretrained weights are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
            f"{offline_alternative(f'timm:{name}')}; or run this once where {host} is reachable (the weights are then "
            f"cached); or pass --weights FILE (a state dict of timm's {name})") from None


def make(name: str, spec: WeightsSpec) -> nn.Module:
    timm = _timm()
    if spec.kind == "imagenet":
        return pretrained(timm, name)
    model = seeded(spec.seed, lambda: timm.create_model(name, pretrained=False, num_classes=0))
    if spec.kind == "file":
        head = model.pretrained_cfg.get("classifier") or "head"  # one name, or several (distilled models)
        load_state_file(model, spec, f"timm {name}", ignore=tuple(f"{h}." for h in
                                                                 ([head] if isinstance(head, str) else head)))
    return model


class TimmPlugin:
    def names(self) -> list[str]:
        return ["timm:NAME"]

    def find(self, name: str, layer: str | None) -> Backbone | None:
        if not name.startswith("timm:"):
            return None
        model_name = name.removeprefix("timm:")
        timm = _timm()
        if not timm.is_model(model_name):
            raise InputError(f"--backbone {name}: timm has no model {model_name!r} (timm.list_models() lists them)")
        if layer not in (None, "pool"):
            raise InputError(f"--layer {layer!r}: timm backbones give their pooled features (layer pool)")
        pretrained = timm.models.get_pretrained_cfg(model_name)  # timm's data config, without building the model
        cfg = timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else {})
        crop = int(cfg["input_size"][-1])
        preset = Preset(int(math.floor(crop / cfg.get("crop_pct", 0.875))), crop, tuple(cfg["mean"]),
                        tuple(cfg["std"]), cfg.get("interpolation", "bilinear"))
        tag = (pretrained.hf_hub_id or f"{model_name}.{pretrained.tag}") if pretrained else "none"
        return Backbone(name, "pool", preset, lambda spec: make(model_name, spec), f"timm:{tag}",
                        note="timm's pooled features; pretrained weights need its hub",
                        make_meta=lambda: _timm().create_model(model_name, pretrained=False, num_classes=0))


plugin = TimmPlugin()
