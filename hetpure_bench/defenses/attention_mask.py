"""The classifier-attention mask of heterogeneous-noise purification (Pei et al., CVPR 2025).

Per hooked block: attention map = sum over channels of |A|^p, bilinearly upsampled to the image
size and normalised per image; the union over blocks is the pixel-wise max; the mask is 1 where
the union reaches the threshold tau (or lies in the top-k percent): 1 = high attention = strong
noise. The mask is detached, as in the reference code; the mask-aware adaptive attack uses a
straight-through relaxation instead (``temperature``): the same binary mask forward, the
gradient of sigmoid((union - tau) / temperature) backward, so the attacker can move the mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.classifiers import MASK_HOOKS

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MaskConfig:
    """How the mask is computed. Defaults are the reference's CIFAR-10 settings."""

    hooks: tuple[str, ...] = MASK_HOOKS["resnet-18"]
    p: float = 2.0
    normalise: str = "minmax"  # or "softmax" (the seed summary's wording)
    tau: float = 0.9  # threshold on the normalised union (first release: 0.85)
    top_percent: float | None = None  # keep the top k% of pixels instead of thresholding (ImageNet: 15)
    reference_input: bool = False  # the reference's quirk: [-1,1] images with ImageNet mean/std

    def __post_init__(self):
        if self.normalise not in ("minmax", "softmax"):
            raise UserError(f"mask normalise must be 'minmax' or 'softmax', got {self.normalise!r}")
        if self.top_percent is None and not 0 <= self.tau <= 1:
            raise UserError(f"mask tau must be in [0, 1], got {self.tau}")


@contextmanager
def capture_attention(
    model: nn.Module, names: tuple[str, ...], p: float, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward pass stores sum_c |A|^p of the named modules' outputs
    (differentiable when ``detach`` is False).

    The hooks exist only inside the ``with`` block and are removed on exit, also after an
    exception (the reference code registered new hooks on every call and never removed them).
    """
    if not names:
        raise UserError("the attention mask needs at least one hooked block")
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise UserError(f"classifier has no module(s) {', '.join(missing)} to hook for the mask")
    maps: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            # Reduced at once: some hooked ReLUs are in-place and their output may change later.
            # (The clone keeps autograd valid when the module's output is later changed in place.)
            activation = output.detach() if detach else output.clone()
            maps[name] = activation.abs().pow(p).sum(dim=1, keepdim=True)

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def normalise_map(attention: torch.Tensor, how: str) -> torch.Tensor:
    """Per-image normalisation of (B, 1, H, W) maps to [0, 1].

    "minmax": (a - min) / (max - min). "softmax": spatial softmax, divided by its maximum so that
    the most attended pixel is 1 and a threshold tau keeps its meaning.
    """
    flat = attention.flatten(1)
    if how == "minmax":
        low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        flat = (flat - low) / (high - low).clamp_min(1e-12)
    else:
        flat = flat.softmax(1)
        flat = flat / flat.max(1, keepdim=True).values
    return flat.view_as(attention)


def union_map(maps: list[torch.Tensor], size: tuple[int, int], how: str) -> torch.Tensor:
    """Upsample each block's map to ``size``, normalise, and take the pixel-wise max."""
    upsampled = [
        normalise_map(F.interpolate(m, size=size, mode="bilinear", align_corners=False), how) for m in maps
    ]
    return torch.stack(upsampled).amax(0)


def threshold_map(
    union: torch.Tensor, tau: float, top_percent: float | None, temperature: float | None = None
) -> torch.Tensor:
    """1 where the union reaches tau (or is among the top ``top_percent`` % of pixels), else 0.

    With a ``temperature``: the same values, with the straight-through gradient of
    sigmoid((union - threshold) / temperature).
    """
    flat = union.flatten(1)
    if top_percent is None:
        threshold = torch.full_like(flat[:, :1], tau)
    else:
        keep = max(1, round(flat.shape[1] * top_percent / 100))
        threshold = flat.detach().topk(keep, dim=1).values[:, -1:]
    hard = (flat >= threshold).to(union.dtype)
    if temperature is not None:
        soft = torch.sigmoid((flat - threshold) / temperature)
        hard = hard + (soft - soft.detach())  # exactly 0 forward: the same binary mask
    return hard.view_as(union)


def attention_mask(
    classifier: nn.Module, x01: torch.Tensor, config: MaskConfig, temperature: float | None = None
) -> torch.Tensor:
    """The binary attention mask (B, 1, H, W) of [0,1] images ``x01``; 1 = high attention.

    Detached unless a ``temperature`` asks for the straight-through relaxation.
    """
    differentiable = temperature is not None and torch.is_grad_enabled()
    inputs = x01 if differentiable else x01.detach()
    if config.reference_input:
        mean = x01.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x01.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        inputs = (inputs * 2 - 1 - mean) / std
    with torch.set_grad_enabled(differentiable), capture_attention(classifier, config.hooks, config.p, detach=not differentiable) as maps:
        classifier(inputs)
        union = union_map([maps[name] for name in config.hooks], tuple(x01.shape[-2:]), config.normalise)
        return threshold_map(union, config.tau, config.top_percent, temperature if differentiable else None)
