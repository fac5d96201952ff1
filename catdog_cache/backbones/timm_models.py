"""timm:NAME when timm is installed: pooled features (num_classes=0) with timm's own data config. Pretrained
weights come from timm's hub (online); --weights FILE works offline. timm (and torch) are imported only for a
timm:NAME backbone, when it is resolved."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..backbone import Backbone, Preset, WeightsSpec
from ..errors import InputError, WeightsUnavailable
from .loading import load_state_file, seeded

if TYPE_CHECKING:
    from torch import nn


def _timm():
    try:
        import timm
    except ImportError:
        raise InputError("--backbone timm:NAME needs timm: pip install timm") from None
    return timm


def make(name: str, spec: WeightsSpec) -> nn.Module:
    timm = _timm()
    if spec.kind == "imagenet":
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:
            raise WeightsUnavailable(f"timm:{name} pretrained weights need timm's hub ({type(e).__name__}): pass "
                                     "--weights FILE (a state dict) or --weights random offline") from None
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
