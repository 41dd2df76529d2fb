"""Sparse convolutional autoencoder of the ICASSP'20 ambiguation scheme.

Data flow (64x64 input, `down=3`, L code maps of length m)::

    image (B, 3, 64, 64) normalised per the card's InputSpec
      └─ DownBlock x3 (stride 2)        → (B, C, 8, 8)
      └─ ResBlock                        → (B, C, 8, 8)
      └─ 1x1 conv C → L                  → (B, L, 8, 8)   one channel per code map
      └─ GroupedLinear per map (64 → m)  → (B, L, m)
      └─ TopK(k) per map                 → code (B, L, m), exactly k non-zeros per map
    code
      └─ GroupedLinear per map (m → 64)  → (B, L, 8, 8)
      └─ 1x1 conv L → C, ResBlock, UpBlock x3 (stride 2), 3x3 conv → logits (B, 3, 64, 64)
      └─ sigmoid                          → image in [0, 1]

The decoder has its own grouped matrices (the reference ties them to the transposed
encoder matrices; untied ones gave the decoder more freedom at our very small k).
`SparseEncoder` (encoder + top-k at the test-time k) is the on-device graph: export and
its parity test both build it with `SparseAutoencoder.on_device_encoder()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


# --- blocks ---------------------------------------------------------------------------


def top_k_per_map(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest magnitudes (with their signs) of each code map, zero the rest.

    z: (B, L, m) → (B, L, m) with exactly k non-zeros per map (ties broken by TopK).
    Gradients flow through the kept entries only.
    """
    if k >= z.shape[-1]:
        return z
    idx = z.abs().topk(k, dim=-1).indices
    return torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))


class TopK(nn.Module):
    """`top_k_per_map` as a module with distinct train-time and test-time k."""

    def __init__(self, k_train: int, k_test: int) -> None:
        super().__init__()
        self.k_train, self.k_test = k_train, k_test

    def forward(self, z: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return top_k_per_map(z, k if k is not None else (self.k_train if self.training else self.k_test))


class GroupedLinear(nn.Module):
    """L independent linear maps, one per group: (B, L, d_in) → (B, L, d_out)."""

    def __init__(self, groups: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(groups, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(groups, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (L, B, d_in) @ (L, d_in, d_out): a batched matmul, exported as one MatMul node
        return torch.matmul(x.transpose(0, 1), self.weight).transpose(0, 1) + self.bias


class ResBlock(nn.Module):
    """Two 3x3 convs with a skip: (B, C, H, W) → (B, C, H, W)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, H, W) → (B, c_out, H/2, W/2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, H, W) → (B, c_out, 2H, 2W)."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


# --- model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseAEConfig:
    """Shape of the autoencoder. `down` stride-2 blocks take H x W to H/2^down x W/2^down."""

    height: int = 64
    width: int = 64
    L: int = 4
    m: int = 256
    k_train: int = 10
    k: int = 10
    channels: tuple[int, ...] = (32, 64, 64)

    @property
    def down(self) -> int:
        return len(self.channels)

    @property
    def map_hw(self) -> tuple[int, int]:
        s = 2 ** self.down
        if self.height % s or self.width % s:
            raise ValueError(f"input {self.height}x{self.width} is not divisible by 2^{self.down}")
        return self.height // s, self.width // s


class ConvEncoder(nn.Module):
    """image (B, 3, H, W) → pre-sparsity code (B, L, m)."""

    def __init__(self, cfg: SparseAEConfig) -> None:
        super().__init__()
        chans = (3, *cfg.channels)
        self.convs = nn.Sequential(*[down_block(a, b) for a, b in zip(chans[:-1], chans[1:])], ResBlock(chans[-1]))
        self.to_maps = nn.Conv2d(chans[-1], cfg.L, 1)
        h, w = cfg.map_hw
        self.linear = GroupedLinear(cfg.L, h * w, cfg.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.to_maps(self.convs(x)).flatten(2))


class ConvDecoder(nn.Module):
    """sparse code (B, L, m) → image logits (B, 3, H, W)."""

    def __init__(self, cfg: SparseAEConfig) -> None:
        super().__init__()
        self.hw = cfg.map_hw
        self.linear = GroupedLinear(cfg.L, cfg.m, self.hw[0] * self.hw[1])
        chans = tuple(reversed(cfg.channels))
        self.from_maps = nn.Sequential(nn.Conv2d(cfg.L, chans[0], 1), nn.LeakyReLU(0.2, inplace=True), ResBlock(chans[0]))
        outs = (*chans[1:], chans[-1])
        self.ups = nn.Sequential(*[up_block(a, b) for a, b in zip(chans, outs)])
        self.to_rgb = nn.Conv2d(outs[-1], 3, 3, padding=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        b, L, _ = code.shape
        maps = self.linear(code).reshape(b, L, *self.hw)
        return self.to_rgb(self.ups(self.from_maps(maps)))


class SparseEncoder(nn.Module):
    """On-device graph: normalised image (B, 3, H, W) → code (B, L, m), k non-zeros per map."""

    def __init__(self, encoder: ConvEncoder, k: int) -> None:
        super().__init__()
        self.encoder, self.k = encoder, k

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return top_k_per_map(self.encoder(image), self.k)


class ImageDecoder(nn.Module):
    """Authorised user's graph: code (B, L, m) → image (B, 3, H, W) in [0, 1]."""

    def __init__(self, decoder: ConvDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(code))


class SparseAutoencoder(nn.Module):
    """Encoder → top-k → decoder. `forward` returns {"code": (B, L, m), "logits": (B, 3, H, W)}."""

    def __init__(self, cfg: SparseAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ConvEncoder(cfg)
        self.topk = TopK(cfg.k_train, cfg.k)
        self.decoder = ConvDecoder(cfg)

    def forward(self, x: torch.Tensor, k: int | None = None) -> dict[str, torch.Tensor]:
        code = self.topk(self.encoder(x), k)
        return {"code": code, "logits": self.decoder(code)}

    def on_device_encoder(self) -> SparseEncoder:
        return SparseEncoder(self.encoder, self.cfg.k)

    def image_decoder(self) -> ImageDecoder:
        return ImageDecoder(self.decoder)
