"""Gradient modes: what the attacker differentiates.

- "full": the very defense that is evaluated, exactly (every network call checkpointed);
- "surrogate:K": a K-network-call version of the defense (the reference's 2-call attacks);
- "bpda": the defense's forward pass, identity backward through the purifier (Athalye et al.,
  ICML 2018), so the gradient is the classifier's at the purified image.
Rows attacked with anything but "full" are labelled so. The mask-aware option (for defenses
with an attention mask) makes the mask differentiable before the mode is applied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..defenses.base import Defense, exposes_deviation_states
from ..errors import UserError


def parse_gradient_mode(mode: str) -> tuple[str, int | None]:
    kind, _, arg = mode.partition(":")
    if kind in ("full", "bpda") and not arg:
        return kind, None
    if kind == "surrogate" and arg.isdigit() and int(arg) >= 1:
        return "surrogate", int(arg)
    raise UserError(f"unknown gradient mode {mode!r}: use 'full', 'surrogate:K' (K >= 1 network calls) or 'bpda'")


class BPDA(nn.Module):
    """Forward: exactly the defense's logits. Backward: the purifier counts as the identity."""

    def __init__(self, defense: Defense):
        super().__init__()
        self.defense = defense

    def reseed(self, seed: int) -> None:
        self.defense.reseed(seed)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            purified = self.defense.purify(x01)
        return self.defense.classifier(x01 + (purified - x01).detach())


def check_mask_aware(mode: str, defense_name: str, config: Any) -> None:
    """The mask-aware attack needs gradients through the purifier and an attention mask."""
    if parse_gradient_mode(mode)[0] == "bpda":
        raise UserError("the mask-aware attack needs gradients through the purifier: use gradient 'full' or 'surrogate:K'")
    if getattr(config, "mask_mode", None) != "attention":
        raise UserError(f"defense {defense_name!r} has no attention mask for the mask-aware attack")


def check_attention_mask(mode: str, defense: Defense, attack: str) -> None:
    """The mask attacks (mask-aware-apgd, mask-avoiding-apgd) need the defense's attention mask
    (``Defense.has_attention_mask``) and gradients through the purifier."""
    if parse_gradient_mode(mode)[0] == "bpda":
        raise UserError(f"{attack} needs gradients through the purifier: use gradient 'full' or 'surrogate:K'")
    if not (isinstance(defense, Defense) and defense.has_attention_mask):
        raise UserError(f"defense {getattr(defense, 'name', type(defense).__name__)!r} has no attention mask: {attack} attacks one")


def check_deviation_states(mode: str, defense: Defense | type[Defense]) -> None:
    """DiffAttack needs gradients through the purifier and its reverse-process states."""
    if parse_gradient_mode(mode)[0] == "bpda":
        raise UserError("diffattack needs gradients through the purifier: use gradient 'full' or 'surrogate:K'")
    if not exposes_deviation_states(defense):
        name = (defense if isinstance(defense, type) else type(defense)).name
        raise UserError(f"defense {name!r} exposes no reverse-process states: diffattack needs them")


def attack_model(defense: Defense, mode: str, mask_temperature: float | None = None) -> nn.Module:
    """The module whose gradient the attack follows (its forward may be cheaper than the
    defense's for surrogates; robustness is always judged on the defense itself)."""
    kind, calls = parse_gradient_mode(mode)
    if mask_temperature is not None:
        check_mask_aware(mode, defense.name, defense.config)
        defense = defense.with_mask_gradient(mask_temperature)
    if kind == "full":
        return defense
    if kind == "bpda":
        return BPDA(defense)
    return defense.surrogate(calls)
