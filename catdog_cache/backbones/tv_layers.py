"""The torchvision plugin's layer names and the ResNets it builds without torchvision, shared by its description
(tvmodels) and its models (tv_net) so that neither imports the other back: tvmodels imports tv_net (torch) only to
build a model, and tv_net never imports tvmodels. Imports nothing but dataclasses."""

from dataclasses import dataclass

FINAL = "logits-input"  # the layer name recorded for "input of the final Linear"


@dataclass(frozen=True)
class Recorded:
    """A ResNet's DEFAULT weights and their eval preset's resize as torchvision 0.29 defines them (crop 224,
    ImageNet mean and std, bilinear; a test compares all of it with the installed torchvision): read without
    importing torchvision, whose import costs about 1.2 s (it pulls in torch._dynamo)."""

    weights: str
    file: str
    resize: int

    @property
    def url(self) -> str:
        return f"https://download.pytorch.org/models/{self.file}"


RESNETS = {
    "resnet18": Recorded("IMAGENET1K_V1", "resnet18-f37072fd.pth", 256),
    "resnet34": Recorded("IMAGENET1K_V1", "resnet34-b627a593.pth", 256),
    "resnet50": Recorded("IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 232),
    "resnet101": Recorded("IMAGENET1K_V2", "resnet101-cd907fc2.pth", 232),
    "resnet152": Recorded("IMAGENET1K_V2", "resnet152-f82ba261.pth", 232),
}
