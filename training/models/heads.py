"""Classifiers on the feature map: co-trained adversaries (private attributes) and the
primary-task heads. Each returns one logit per binary attribute."""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import ConvBNReLU


class ConvHead(nn.Module):
    """Small CNN on the feature map: (B, C, h, w) -> (B, n_out) logits."""

    def __init__(self, in_channels: int, n_out: int, feature_hw: tuple[int, int] = (8, 8), width: int = 64) -> None:
        super().__init__()
        h, w = (feature_hw[0] + 1) // 2, (feature_hw[1] + 1) // 2
        self.net = nn.Sequential(
            ConvBNReLU(in_channels, width),
            ConvBNReLU(width, width, stride=2),
            nn.Flatten(),
            nn.Linear(width * h * w, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, n_out),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPHead(nn.Module):
    """MLP on the flattened feature: (B, C, h, w) -> (B, n_out)."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, n_out)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LinearHead(nn.Module):
    """Logistic regression on the flattened feature: (B, C, h, w) -> (B, n_out)."""

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, n_out))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
