"""Image quality, defined once for every audit: PSNR and SSIM (scikit-image).

Convention: images are float arrays (N, H, W, 3) in [0, 1], channels last as the data set
stores photos; both measures use `data_range=1`, SSIM over the three channels
(`channel_axis=-1`). A caller holding channels-first images converts them with
`channels_last` first.
"""

from __future__ import annotations

import numpy as np


def channels_last(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) → (N, H, W, 3)."""
    return np.moveaxis(images, 1, -1)


def image_quality(ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
    """Mean and spread of PSNR (dB) and SSIM over images; ref, rec float (N, H, W, 3) in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if ref.shape != rec.shape or ref.ndim != 4 or ref.shape[-1] != 3:
        raise ValueError(f"image_quality: expected two (N, H, W, 3) arrays of one shape, got {ref.shape} and {rec.shape}")
    psnr = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(ref, rec)]
    ssim = [structural_similarity(a, b, data_range=1.0, channel_axis=-1) for a, b in zip(ref, rec)]
    return {"psnr": float(np.mean(psnr)), "psnr_std": float(np.std(psnr)),
            "ssim": float(np.mean(ssim)), "ssim_std": float(np.std(ssim)), "n": int(len(ref))}


def unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (..., H, W, 3) → float32 in [0, 1], the layout image_quality takes."""
    return np.asarray(pixels, dtype=np.float32) / 255.0
