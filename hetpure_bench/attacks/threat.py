"""Threat models: the norm ball an adversarial example must stay in, and the [0,1] image box."""

from __future__ import annotations

import math

import torch

from ..errors import UserError

NORMS = ("Linf", "L2")
# The largest meaningful budget per norm on 3x32x32 images in [0,1] (the whole box).
MAX_EPS = {"Linf": 1.0, "L2": math.sqrt(3 * 32 * 32)}


def check_threat(norm: str, eps: float) -> None:
    if norm not in NORMS:
        raise UserError(f"unknown threat model {norm!r}: choose Linf or L2")
    if not 0 <= eps <= MAX_EPS[norm]:
        raise UserError(f"eps {eps:g} is out of range for {norm}: 0 <= eps <= {MAX_EPS[norm]:g}")


def perturbation_size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image size (B,) of a perturbation in the threat model's norm."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Back into the eps-ball around the [0,1] images ``x`` and into the [0,1] box."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / norms).clamp(max=1.0).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1)


def mask_avoiding_projection(x_adv: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Onto the perturbations of the [0,1] images ``x`` that leave the pixels where ``mask``
    ((B, 1, H, W) or broadcastable, {0,1}) is 1 untouched, within the eps-ball and the [0,1]
    box: the perturbation zeroed there, then ``project`` (which only shrinks a perturbation
    per pixel, so the zeros stay zero)."""
    return project(x + (x_adv - x) * (1 - mask), x, norm, eps)


def uniform_in_ball(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A random perturbation shaped like ``x``, uniform in the eps-ball of each image: Linf the
    cube; L2 a Gaussian direction at radius eps * U^(1/d), the law of the ball's volume (in
    3072 dimensions nearly always within 0.1% of eps, like the original APGD's start on the sphere)."""
    if norm == "Linf":
        return (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    uniform = torch.rand(x.shape[0], generator=generator, device=x.device)
    return direction * (eps * uniform ** (1 / x[0].numel())).view(-1, 1, 1, 1)
