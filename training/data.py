"""The model builder's side of the data: prepared photos (protocol.datasets) to tensors.

Normalisation is defined by protocol.preprocess.normalize, which the client, the auditor
and the exporter's parity check use; `to_input` is the same float32 arithmetic on torch
tensors (so batches can be normalised on the GPU), and tests/training/test_data.py pins
the two to identical values for RGB and BGR cards. The channel order is applied once, by
protocol.preprocess.prepare: pixels here are already in the card's order.
"""

from __future__ import annotations

import numpy as np
import torch

from protocol.model_card import InputSpec


def to_input(pixels: np.ndarray | torch.Tensor, spec: InputSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) in the card's channel order → normalised float32 (B, 3, H, W)."""
    x = torch.as_tensor(pixels)
    if device is not None:
        x = x.to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float32 (B, 3, H, W) in [0, 1] (reconstruction targets)."""
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda: auto takes CUDA when there is one."""
    from protocol.errors import InvalidInputError

    if name not in ("auto", "cpu", "cuda"):
        raise InvalidInputError(f"--device {name!r}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
