"""A preset's eval transform on a PIL image (resize the shorter side, center crop, scale to [0, 1], normalise), in
Pillow, numpy and torch alone: the same operations, in the same order and dtype, as torchvision's
`ImageClassification` preset (bit for bit: tests compare them), without importing torchvision, whose import pulls in
torch._dynamo and costs a small extract more than its work."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# torchvision's InterpolationMode values -> Pillow's resampling filters (as torchvision's pil_modes_mapping)
PIL_FILTERS = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}


class EvalTransform:
    """RGB PIL image -> [3, crop, crop] float32, normalised."""

    def __init__(self, resize: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...],
                 interpolation: str = "bilinear") -> None:
        self.resize, self.crop, self.filter = resize, crop, PIL_FILTERS[interpolation]
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self.filter)
        img = center_crop(img, self.crop)
        x = torch.as_tensor(np.array(img, copy=True)).view(img.size[1], img.size[0], len(img.getbands()))
        x = x.permute(2, 0, 1).to(torch.float32) / 255.0  # [3, S, S]
        return x.sub_(self.mean).div_(self.std)


def center_crop(img: Image.Image, size: int) -> Any:
    """torchvision's center_crop on a PIL image: zero padding where the image is smaller, then the crop whose
    offsets are rounded as torchvision rounds them."""
    w, h = img.size
    if size > w or size > h:
        pad = ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0,
               (size - w + 1) // 2 if size > w else 0, (size - h + 1) // 2 if size > h else 0)
        img = ImageOps.expand(img, border=pad, fill=tuple([0] * len(img.getbands())))
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
