"""The torchvision plugin's models (torch imported here; the plugin itself, tvmodels, imports none, and nothing
here imports tvmodels: FINAL comes from tv_layers): the network cut at the input of its final Linear or at a graph
node, with torchvision's DEFAULT weights or a state-dict file."""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import WeightsSpec
from ..errors import InputError
from .loading import RecordedWeights, load_state_file, seeded, torchvision_state_dict
from .resnet_net import resnet
from .tv_layers import FINAL, RESNETS


def final_linear(model: nn.Module) -> str:
    """The qualified name of the last nn.Linear: the classification layer of every torchvision classifier."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InputError(f"{type(model).__name__} has no final Linear layer; give a graph node with --layer")
    return names[-1]


def cut(model: nn.Module, layer: str) -> nn.Module:
    if layer == FINAL:
        parent_name, _, child = final_linear(model).rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        return model
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    nodes = get_graph_node_names(model)[1]
    if layer not in nodes:
        near = [n for n in nodes if n.startswith(layer.split(".")[0])][:5]
        raise InputError(f"--layer {layer!r} is not a graph node of this model (e.g. {', '.join(near or nodes[-5:])})")
    return Flatten(create_feature_extractor(model, return_nodes={layer: "out"}))


class Flatten(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.inner(x)["out"], 1)  # [B, C*H*W]


def make(name: str, layer: str, spec: WeightsSpec) -> nn.Module:
    if name in RESNETS and layer == FINAL:
        return make_resnet(name, spec)
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(name).DEFAULT
    if spec.kind == "random":
        return cut(seeded(spec.seed, lambda: get_model(name, weights=None)), layer)
    with torch.device("meta"):
        model = get_model(name, weights=None)
    if spec.kind == "imagenet":
        model.load_state_dict(torchvision_state_dict(weights, name, name), assign=True)
    else:
        load_state_file(model, spec, f"torchvision {name}", ignore=(final_linear(model) + ".",) if layer == FINAL
                        else ())
    return cut(model, layer)


def make_resnet(name: str, spec: WeightsSpec) -> nn.Module:
    """A ResNet at its final Linear's input, built and loaded without torchvision (resnet_net)."""
    if spec.kind == "random":
        return cut(seeded(spec.seed, lambda: resnet(name)), FINAL)
    with torch.device("meta"):
        model = resnet(name)
    if spec.kind == "imagenet":
        model.load_state_dict(torchvision_state_dict(RecordedWeights(RESNETS[name].url), name, name), assign=True)
    else:
        load_state_file(model, spec, f"torchvision {name}", ignore=("fc.",))
    return cut(model, FINAL)


def make_meta(name: str, layer: str) -> nn.Module:
    from torchvision.models import get_model

    return cut(get_model(name, weights=None), layer)
