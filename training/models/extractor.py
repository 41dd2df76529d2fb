"""The on-device feature extractor E_φ: the only network a participant runs.

    image (B, 3, 64, 64)
      └─ ConvBNReLU s2 ─► (B, w, 32, 32)
      └─ ConvBNReLU s2 ─► (B, 2w, 16, 16)
      └─ ConvBNReLU    ─► (B, 2w, 16, 16)     arch "base"; "lite" skips it (0.42x the
                                              multiply-adds at width 16); "fast" runs it
                                              with stride 2, (B, 2w, 8, 8), and the next
                                              conv with stride 1 (0.36x); "patch" replaces
                                              the first two convs by a 4x4 stride-4 one
      └─ Conv s2 + BatchNorm(affine=False) ─► (B, C, 8, 8)    fixed scale, so learned
                                                              noise means something
      └─ [training only, or always with release_noise] + σ·ε, σ = exp(log_sigma) per channel
                                                              (stochastic features)
      └─ LinearEraser (closed-form, fitted after training; identity if not fitted)
    feature (B, C, 8, 8)

Defined once: export and its parity test both build it from here.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import ConvBNReLU, LinearEraser


ARCHS = ("base", "lite", "fast", "patch")


class Extractor(nn.Module):
    """E_φ: (B, 3, H, W) normalised image -> (B, feat_channels, H/8, W/8) feature map."""

    def __init__(
        self,
        width: int = 32,
        feat_channels: int = 16,
        input_size: tuple[int, int] = (64, 64),
        stochastic: bool = False,
        erase_rank: int = 0,
        release_noise: bool = False,
        arch: str = "base",
    ) -> None:
        super().__init__()
        self.feat_channels = feat_channels
        self.feature_shape = (feat_channels, input_size[0] // 8, input_size[1] // 8)
        if arch not in ARCHS:
            raise ValueError(f"unknown extractor arch {arch!r}; valid: {', '.join(ARCHS)}")
        if arch == "patch":  # 4x4 patches straight to 2w channels, then two 3x3 convs
            stem = [nn.Conv2d(3, 2 * width, 4, stride=4, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
                    ConvBNReLU(2 * width, 2 * width, stride=2), ConvBNReLU(2 * width, 2 * width)]
        else:
            middle = {"base": [ConvBNReLU(2 * width, 2 * width)], "lite": [],
                      "fast": [ConvBNReLU(2 * width, 2 * width, stride=2)]}[arch]
            stem = [ConvBNReLU(3, width, stride=2), ConvBNReLU(width, 2 * width, stride=2), *middle]
        self.body = nn.Sequential(
            *stem,
            nn.Conv2d(2 * width, feat_channels, 3, stride=2 if arch in ("base", "lite") else 1, padding=1, bias=False),
            nn.BatchNorm2d(feat_channels, affine=False),
        )
        self.stochastic = stochastic or release_noise
        # release_noise: the noise stays on in eval mode too (a stochastic release: every
        # extraction of the same image gives a different feature)
        self.release_noise = release_noise
        # learned per-channel noise scale; used while training only (see docs/results-pric.md)
        self.log_sigma = nn.Parameter(torch.full((feat_channels,), -2.0)) if self.stochastic else None
        dim = feat_channels * self.feature_shape[1] * self.feature_shape[2]
        self.eraser = LinearEraser(dim, erase_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        if (self.training or self.release_noise) and self.log_sigma is not None:
            z = z + torch.randn_like(z) * self.log_sigma.exp().view(1, -1, 1, 1)
        return self.eraser(z)
