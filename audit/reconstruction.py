"""Reconstruction attack: a decoder trained to invert a release back to the photo."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from audit.attacks import _standardiser
from audit.config import AuditConfig
from audit.releases import Splits, unit_images


class Decoder(nn.Module):
    """Inverts a representation: (B, *shape) → image (B, 3, H, W) in [0, 1].

        map (C, h, w) ─ conv (3x3, or 4x4 stride 4 for image-sized maps) ─┐
        other (D,…)   ─ flatten, linear → (32, H/8, W/8) ──────────────────────────┴► [transposed conv x2]* → conv → sigmoid

    Channels halve (32 → 8) as the map grows: small on purpose, several are trained per audit on CPU.
    """

    def __init__(self, shape: Sequence[int], out_hw: tuple[int, int], width: int = 32) -> None:
        super().__init__()
        h_out, w_out = out_hw
        ch = width
        layers: list[nn.Module] = []
        if len(shape) == 3:
            c, h, _ = (int(v) for v in shape)
            if h > 16:
                layers += [nn.Conv2d(c, ch, 4, stride=4), nn.ReLU()]
                size = h // 4
            else:
                layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU()]
                size = h
        else:
            size = max(h_out // 8, 1)
            sw = max(w_out // 8, 1)
            layers += [nn.Flatten(), nn.Linear(int(np.prod(shape)), ch * size * sw), nn.ReLU(),
                       nn.Unflatten(1, (ch, size, sw))]
        while size < h_out:
            nxt = max(ch // 2, 8)
            # transposed convs: about 3x cheaper on CPU than bilinear upsampling + conv
            layers += [nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch, size = nxt, size * 2
        if size != h_out:
            layers.append(nn.Upsample(size=out_hw, mode="bilinear", align_corners=False))
        layers += [nn.Conv2d(ch, 3, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def train_decoder(x: np.ndarray, pixels: np.ndarray, sp: Splits, cfg: AuditConfig, what: str) -> np.ndarray:
    """Train a decoder on train, select on validation MSE; returns test reconstructions
    float32 (N_te, 3, H, W) in [0, 1]."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_tr = x[sp.tr]
    mean, std = _standardiser(x_tr)
    z = lambda idx_arr, src: (torch.from_numpy(np.ascontiguousarray(src[idx_arr], dtype=np.float32)) - mean) / std  # noqa: E731
    tgt = lambda idx_arr: torch.from_numpy(unit_images(pixels[idx_arr]))  # noqa: E731
    model = Decoder(x.shape[1:], pixels.shape[1:3])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    bs = int(min(64, max(8, len(sp.tr) // 20)))
    best, best_state = float("inf"), None
    for _ in tqdm(range(cfg.recon_epochs), desc=f"decoder on {what}", unit="ep", leave=False,
                  disable=None if cfg.progress else True):
        model.train()
        perm = rng.permutation(len(sp.tr))
        for i in range(0, len(sp.tr), bs):
            idx = np.sort(sp.tr[perm[i:i + bs]])
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((model(z(idx, x)) - tgt(idx)) ** 2)
            loss.backward()
            opt.step()
        val = _decode(model, x, sp.va, mean, std)
        mse = float(np.mean((val - unit_images(pixels[sp.va])) ** 2))
        if mse < best:
            best, best_state = mse, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return _decode(model, x, sp.te, mean, std)


@torch.no_grad()
def _decode(model: nn.Module, x: np.ndarray, idx: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    model.eval()
    out = [model((torch.from_numpy(np.ascontiguousarray(x[idx[i:i + 256]], dtype=np.float32)) - mean) / std).numpy()
           for i in range(0, len(idx), 256)]
    return np.concatenate(out) if out else np.zeros((0, 3, 1, 1), np.float32)
