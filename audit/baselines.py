"""Baseline obfuscations (Manolakos & Soltani, "Privacy-Aware Image Classification"),
released as images and audited on the same harness as PRIC features.

All act on float images in [0, 1] of shape (N, 3, H, W) and return float32 (N, 3, H, W):

* ``blur:K``          Gaussian blur, K x K, sigma = 0.3((K-1)/2 - 1) + 0.8 (OpenCV's rule),
                      reflected borders.
* ``random_filter:K`` one K x K x 3 x 3 filter with i.i.d. N(0, 1) weights, the same for the
                      whole dataset (a secret of the releaser).
* ``iid_filter:K``    a fresh random filter for every image.
* ``scramble:K``      block scrambling: each K x K block's pixels permuted by a random
                      permutation fixed per block position for the whole dataset.

The filters' outputs are not clipped (values may leave [0, 1]); attackers standardise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BASELINES = ("blur", "random_filter", "iid_filter", "scramble")
# `--baselines all`: several blur sizes, both random filters, scrambling at 2, 4 and 8.
ALL_SPECS = ("blur:5", "blur:9", "blur:15", "random_filter:5", "iid_filter:5", "scramble:2", "scramble:4", "scramble:8")
_CHUNK = 512


def blur_sigma(k: int) -> float:
    """OpenCV's default sigma for a K x K Gaussian kernel."""
    return 0.3 * ((k - 1) / 2 - 1) + 0.8


def gaussian_kernel1d(k: int) -> np.ndarray:
    """(K,) normalised Gaussian centred at (K-1)/2 with sigma `blur_sigma(k)`."""
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    g = np.exp(-(x ** 2) / (2 * blur_sigma(k) ** 2))
    return (g / g.sum()).astype(np.float32)


@dataclass(frozen=True)
class Baseline:
    """An obfuscation: `apply(images (N, 3, H, W) in [0, 1]) -> float32 (N, 3, H, W)`."""

    name: str
    k: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.name}:{self.k}"

    def apply(self, images: np.ndarray) -> np.ndarray:
        out = np.empty(images.shape, np.float32)
        rng = np.random.default_rng(self.seed + 7919)  # per-image draws (iid_filter)
        for i in range(0, len(images), _CHUNK):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + _CHUNK], dtype=np.float32))
            out[i:i + _CHUNK] = self._apply_chunk(x, rng).numpy()
        return out

    def _apply_chunk(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        raise NotImplementedError


class Blur(Baseline):
    def _apply_chunk(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        g = torch.from_numpy(gaussian_kernel1d(self.k))
        c, p = x.shape[1], self.k // 2
        x = F.pad(x, (p, p, p, p), mode="reflect" if p < min(x.shape[-2:]) else "replicate")
        x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _random_filters(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """(n, 3, 3, K, K) i.i.d. N(0, 1) weights, scaled so outputs keep a similar range."""
    w = (rng.standard_normal((n, 3, 3, k, k)) / np.sqrt(3 * k * k)).astype(np.float32)
    return torch.from_numpy(w)


class RandomFilter(Baseline):
    def _apply_chunk(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        w = _random_filters(np.random.default_rng(self.seed), 1, self.k)[0]
        return F.conv2d(x, w, padding=self.k // 2)


class IIDFilter(Baseline):
    def _apply_chunk(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = _random_filters(rng, n, self.k).reshape(n * 3, 3, self.k, self.k)
        y = F.conv2d(x.reshape(1, n * c, h, w), weights, padding=self.k // 2, groups=n)
        return y.reshape(n, 3, h, w)


class Scramble(Baseline):
    def permutations(self, h: int, w: int) -> np.ndarray:
        """(h/K, w/K, K*K) permutation of each block's pixels, fixed for the dataset."""
        rng = np.random.default_rng(self.seed)
        return np.stack([rng.permutation(self.k * self.k) for _ in range((h // self.k) * (w // self.k))]).reshape(
            h // self.k, w // self.k, self.k * self.k)

    def _apply_chunk(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.k
        if h % k or w % k:
            raise ValueError(f"scramble:{k} needs image sides divisible by {k}, got {h}x{w}")
        blocks = x.reshape(n, c, h // k, k, w // k, k).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // k, w // k, k * k)
        perm = torch.from_numpy(self.permutations(h, w)).expand(n, c, -1, -1, -1)
        blocks = torch.gather(blocks, -1, perm)
        return blocks.reshape(n, c, h // k, w // k, k, k).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


_FACTORY: dict[str, type[Baseline]] = {
    "blur": Blur, "random_filter": RandomFilter, "iid_filter": IIDFilter, "scramble": Scramble,
}
_DEFAULT_K = {"blur": 7, "random_filter": 5, "iid_filter": 5, "scramble": 4}


def create_baseline(name: str, k: int | None = None, seed: int = 0) -> Baseline:
    """Build a baseline by family name (`k`: kernel or block size)."""
    if name not in _FACTORY:
        raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    k = _DEFAULT_K[name] if k is None else int(k)
    if k < 1 or (name == "blur" and k % 2 == 0) or (name != "scramble" and k % 2 == 0):
        raise ValueError(f"baseline {name}: size {k} must be a positive odd number")
    if name == "scramble" and k < 2:
        raise ValueError(f"baseline scramble: block size {k} must be at least 2")
    return _FACTORY[name](name=name, k=k, seed=seed)


def parse_baselines(text: str, seed: int = 0) -> list[Baseline]:
    """'blur:7,scramble:8' or 'all' → baselines; raises ValueError naming a bad entry."""
    specs = ALL_SPECS if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    out = []
    for spec in specs:
        name, _, size = spec.partition(":")
        try:
            k = int(size) if size else None
        except ValueError:
            raise ValueError(f"baseline {spec!r}: size must be an integer (e.g. blur:7)") from None
        out.append(create_baseline(name, k, seed))
    return out
