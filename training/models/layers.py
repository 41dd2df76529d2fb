"""Building blocks shared by the PRIC networks (extractor, adversaries, MI estimator)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, BatchNorm, ReLU: (B, c_in, H, W) -> (B, c_out, H/stride, W/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`.

    Lets one forward pass serve two players that share an objective with different
    weights (the MI estimator maximises the JSD bound with weight 1, the extractor with λ),
    so the extractor is run backwards once per step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` unchanged; gradients reaching `x` through the result are scaled by `scale`."""
    if scale == 1.0:
        return x
    return ScaleGrad.apply(x, scale)


class LinearEraser(nn.Module):
    """Closed-form linear erasure of concept directions, a fixed (non-trained) final layer.

    z' = z - A (Bᵀ (z - μ)) on the flattened feature, A and B of shape (D, k).
    With LEACE (Belrose et al. 2023) A = Σ^{1/2} U, B = Σ^{-1/2} U, U an orthonormal basis of
    Σ^{-1/2} Cov(z, u): afterwards no linear classifier predicts u better than a constant
    on the fitting distribution. Identity while `k == 0` (not fitted).

    Input/output: (B, C, h, w).
    """

    def __init__(self, dim: int, rank: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("a", torch.zeros(dim, rank))
        self.register_buffer("b", torch.zeros(dim, rank))

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return z
        flat = z.flatten(1)
        flat = flat - ((flat - self.mean) @ self.b) @ self.a.T
        return flat.view_as(z)

    @torch.no_grad()
    def fit(self, z: torch.Tensor, u: torch.Tensor, eps: float = 1e-5) -> None:
        """Fit LEACE on features z (N, C, h, w) or (N, D) and concept labels u (N, K) in {0, 1}."""
        x = z.flatten(1).double()
        y = u.double().reshape(len(u), -1)
        mu = x.mean(0)
        xc = x - mu
        sigma = xc.T @ xc / max(1, len(x) - 1)
        sigma_xz = xc.T @ (y - y.mean(0)) / max(1, len(x) - 1)  # (D, K)
        evals, evecs = torch.linalg.eigh(sigma)
        keep = evals > eps * evals.max()
        ev, vec = evals[keep], evecs[:, keep]
        whiten = vec @ torch.diag(ev.rsqrt()) @ vec.T  # Σ^{-1/2} (pseudo)
        unwhiten = vec @ torch.diag(ev.sqrt()) @ vec.T  # Σ^{1/2}
        m = whiten @ sigma_xz
        q, r = torch.linalg.qr(m)
        rank_ok = r.diagonal().abs() > 1e-8 * max(1.0, float(r.abs().max()))
        q = q[:, rank_ok]
        self.mean = mu.float()
        self.a = (unwhiten @ q).float()
        self.b = (whiten @ q).float()
