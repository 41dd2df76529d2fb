"""T_ω(x, z, u): the Deep InfoMax discriminator of the JSD mutual-information bound.

Local (per-location) form, cheap enough to keep an adversarial step under 2x a plain one:

    x (B, 3, 64, 64) ─ pixel_unshuffle(8) ─► (B, 192, 8, 8) ─ 1x1 ┐
    z (B, C, 8, 8) ──────────────────────────────────────── 1x1 ┼─ sum ─ ReLU ─ 1x1 convs ─► (B, 1, 8, 8)
    u (B, K) ─ linear, broadcast ────────────────────────────────┘
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MIEstimator(nn.Module):
    """Scores (x, z, u) triples; returns per-location scores (B, h*w).

    The first layer is linear in the concatenation [x; z; u], so it is split per input:
    the x part is computed once per batch (`encode_x`) and permuted for the marginal x'.
    """

    def __init__(self, feat_channels: int, n_private: int, hidden: int = 128, downscale: int = 8) -> None:
        super().__init__()
        self.downscale = downscale
        self.x_proj = nn.Conv2d(3 * downscale * downscale, hidden, 1)
        self.z_proj = nn.Conv2d(feat_channels, hidden, 1, bias=False)
        self.u_proj = nn.Linear(n_private, hidden, bias=False)
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))

    def encode_x(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, hidden, H/s, W/s); computed once per batch, reused for x'."""
        return self.x_proj(F.pixel_unshuffle(x, self.downscale))

    def forward(self, x_code: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h = x_code.to(z.dtype) + self.z_proj(z) + self.u_proj(u.to(z.dtype))[:, :, None, None].to(z.dtype)
        return self.net(h).flatten(1)
