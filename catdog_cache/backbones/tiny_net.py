"""The tiny test backbone's model (torch imported here, not by the plugin)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """[B, 3, 224, 224] -> [B, 4096], non-negative like fc7 after ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 4 * 4, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))  # [B, 8, 28, 28]
        x = self.pool(x).flatten(1)  # [B, 128]
        return torch.relu(self.fc(x))  # [B, 4096]
