"""Gradient modes: what the attacker differentiates.

- "full": the very defense that is evaluated, exactly (every network call checkpointed);
- "surrogate:K": a K-network-call version of the defense (the reference's 2-call attacks);
  rows attacked this way are labelled so.
"""

from __future__ import annotations

from torch import nn

from ..defenses.base import Defense
from ..errors import UserError


def parse_gradient_mode(mode: str) -> tuple[str, int | None]:
    kind, _, arg = mode.partition(":")
    if kind == "full" and not arg:
        return "full", None
    if kind == "surrogate" and arg.isdigit() and int(arg) >= 1:
        return "surrogate", int(arg)
    raise UserError(f"unknown gradient mode {mode!r}: use 'full' or 'surrogate:K' (K >= 1 network calls)")


def attack_model(defense: Defense, mode: str) -> nn.Module:
    """The module whose gradient the attack follows."""
    kind, calls = parse_gradient_mode(mode)
    return defense if kind == "full" else defense.surrogate(calls)
