"""Differentiable SSIM (Wang et al., 2004) with an 11x11 Gaussian window (sigma 1.5).

Computed per channel and averaged over channels and positions: one value per image. The
positions are the 'valid' region (no padding, the original definition) or, with
``padding="same"``, every pixel with the window zero-padded at the borders (the common
pytorch_ssim code, which GDMP uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDINGS = ("same", "valid")


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    padding: str = "valid",
) -> torch.Tensor:
    """Per-image SSIM of two batches (B, C, H, W); the constants are C1 = (0.01 data_range)^2 and
    C2 = (0.03 data_range)^2. ``padding`` is "valid" or "same" (zero-padded, odd ``window``)."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    channels = a.shape[1]
    kernel = gaussian_window(window, sigma, a.dtype, a.device).expand(channels, 1, window, window)
    pad = window // 2 if padding == "same" else 0

    def blur(x):
        return F.conv2d(x, kernel, padding=pad, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)
