"""Adaptive attacks on an attention mask, the heterogeneous-noise paper's stated weakness (the
attacker may target the mask): APGD-EOT (attacks/apgd.py) with one thing changed each.

- ``MaskAwareAPGD`` (mask-aware-apgd): the gradient flows through the mask too, by the
  straight-through relaxation of ``Defense.with_mask_gradient``: the same binary mask forward,
  the gradient of sigmoid((union - tau) / T) backward. T is fixed (``temperature``, default 0.05)
  or annealed (``anneal: [T_start, T_end]``): geometric from T_start at a restart's first pass
  (its start point) to T_end at its last. The forward pass, so every loss, is the defense's at any
  T, so losses of passes at different temperatures compare. The relaxed copy is built once per
  attack and draws its noise from the target's own streams (the runner's per-image attack
  streams), so the noise goes on from pass to pass as it does for APGD-EOT on the target.
- ``MaskAvoidingAPGD`` (mask-avoiding-apgd): every iterate is projected onto the perturbations
  that leave the high-attention pixels (mask 1: strong noise t_l) untouched, so the perturbation
  sits where the defense adds only weak noise (t_s). The mask is the defense's detached attention
  mask (``Defense.attention_mask``) of the iterate the step started from (for a restart's start
  point: of the clean image). So every iterate, the returned one included, has zero perturbation
  on the mask of the iterate it was reached from; not necessarily on its own mask, which the
  perturbation may move. One extra classifier pass per step (the mask), no diffusion call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..defenses.base import Defense
from ..errors import UserError
from .apgd import APGDEOT
from .convergence import AttackHistory
from .gradients import check_attention_mask
from .threat import mask_avoiding_projection

DEFAULT_TEMPERATURE = 0.05


def geometric_schedule(start: float, end: float, passes: int) -> list[float]:
    """``passes`` temperatures from ``start`` (the first) to ``end`` (the last), a constant ratio
    between consecutive ones; one pass: ``start``."""
    if passes == 1:
        return [start]
    return [start * (end / start) ** (k / (passes - 1)) for k in range(passes)]


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _masked_defense(model: nn.Module, attack: str) -> Defense:
    """``model`` if it is a defense with an attention mask (the attack needs the mask itself)."""
    if not (isinstance(model, Defense) and model.has_attention_mask):
        raise UserError(f"{attack} needs a defense with an attention mask, not {type(model).__name__}: "
                        "use gradient 'full' or 'surrogate:K'")
    return model


class ScheduledTemperature:
    """The relaxed defense with its mask temperature set from ``temperatures`` before each pass."""

    def __init__(self, relaxed: Defense, temperatures: list[float]):
        self.relaxed = relaxed
        self.temperatures: Iterator[float] = iter(temperatures)

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        self.relaxed.mask_temperature = next(self.temperatures)
        return self.relaxed(x01)


@dataclass(frozen=True)
class MaskAwareAPGD(APGDEOT):
    """APGD-EOT through the relaxed mask: ``temperature`` (default 0.05) or ``anneal`` (T_start, T_end)."""

    temperature: float | None = None
    anneal: tuple[float, float] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.temperature is not None and self.anneal is not None:
            raise UserError("mask-aware-apgd takes a temperature or an anneal [T_start, T_end], not both")
        if self.temperature is not None and not _positive(self.temperature):
            raise UserError(f"mask-aware-apgd temperature must be a number > 0, got {self.temperature!r}")
        if self.anneal is not None:
            anneal = self.anneal.split(",") if isinstance(self.anneal, str) else self.anneal
            try:
                anneal = tuple(float(t) for t in anneal)
            except (TypeError, ValueError):
                anneal = ()
            if len(anneal) != 2 or not all(t > 0 for t in anneal):
                raise UserError(f"mask-aware-apgd anneal must be [T_start, T_end], both > 0, got {self.anneal!r}")
            object.__setattr__(self, "anneal", anneal)  # a list from YAML: keep the attack hashable

    def temperatures(self) -> list[float]:
        """The mask temperature of each pass of one restart (its start point, then each iteration)."""
        if self.anneal is not None:
            return geometric_schedule(*self.anneal, self.steps + 1)
        return [self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE] * (self.steps + 1)

    def name_fields(self) -> list[str]:
        if self.anneal is not None:
            return [*super().name_fields(), f"T {self.anneal[0]:g} to {self.anneal[1]:g} geometric"]
        return [*super().name_fields(), f"T {self.temperatures()[0]:g}"]

    @property
    def name(self) -> str:
        return f"APGD-EOT-mask-aware({', '.join(self.name_fields())})"

    def check_target(self, gradient: str, defense: Defense) -> None:
        check_attention_mask(gradient, defense, "mask-aware-apgd")

    def perturb_with_history(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttackHistory]:
        """APGDEOT's, against the defense ``model`` with its mask relaxed: one relaxed copy for
        the whole attack, drawing from ``model``'s noise streams (a copy per pass would restart
        the noise at every pass)."""
        relaxed = _masked_defense(model, "mask-aware-apgd").with_mask_gradient(self.temperatures()[0])
        with relaxed.drawing_noise_from(model.noise):
            return super().perturb_with_history(relaxed, x, y, progress, start)

    def iterates(self, model, x, y, generator, start=None):
        """One restart of APGDEOT's against the relaxed defense ``model``, its temperature set
        from the schedule before each pass."""
        return super().iterates(ScheduledTemperature(model, self.temperatures()), x, y, generator, start)


@dataclass(frozen=True)
class MaskAvoidingAPGD(APGDEOT):
    """APGD-EOT whose iterates leave the mask of the iterate they were reached from untouched."""

    @property
    def name(self) -> str:
        return f"APGD-EOT-mask-avoiding({', '.join(self.name_fields())})"

    def check_target(self, gradient: str, defense: Defense) -> None:
        check_attention_mask(gradient, defense, "mask-avoiding-apgd")

    def perturb_with_history(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttackHistory]:
        """APGDEOT's, every iterate projected off the attention mask (``constrain``)."""
        return super().perturb_with_history(_masked_defense(model, "mask-avoiding-apgd"), x, y, progress, start)

    def constrain(self, model: nn.Module, x_from: torch.Tensor, x_next: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_next`` with zero perturbation where the attention mask of ``x_from`` is 1."""
        return mask_avoiding_projection(x_next, x, model.attention_mask(x_from), self.norm, self.eps)
