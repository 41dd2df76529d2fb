"""T_ω(x, z, u): the Deep InfoMax discriminator of the JSD mutual-information bound.

Local (per-location) form, cheap enough to keep an adversarial step under 2x a plain one:

    x (B, 3, 64, 64) ─ pixel_unshuffle(8) ─► (B, 192, 8, 8) ┐
    z (B, C, 8, 8) ─────────────────────────────────────────┼─ concat ─ 1x1 convs ─► (B, 1, 8, 8)
    u (B, K) broadcast ─────────────────────────────────────► (B, K, 8, 8) ┘
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MIEstimator(nn.Module):
    """Scores (x, z, u) triples; returns per-location scores (B, h*w)."""

    def __init__(self, feat_channels: int, n_private: int, hidden: int = 128, downscale: int = 8) -> None:
        super().__init__()
        self.downscale = downscale
        c_in = 3 * downscale * downscale + feat_channels + n_private
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def encode_x(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3·s², H/s, W/s); computed once per batch, reused for x'."""
        return F.pixel_unshuffle(x, self.downscale)

    def forward(self, x_code: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        u_map = u.to(z.dtype).view(b, -1, 1, 1).expand(b, u.shape[1], h, w)
        return self.net(torch.cat([x_code.to(z.dtype), z, u_map], dim=1)).flatten(1)
