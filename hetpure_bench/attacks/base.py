"""What every attack is: a frozen dataclass with ``norm``, ``eps``, ``steps`` (None for one-step
attacks) and ``seed`` fields, a ``name`` for result labels, and
``perturb(model, x01, y) -> x_adv01`` for [0,1] images. ``model`` is whatever the gradient mode
says the attacker differentiates (gradients.py); the runner evaluates the real defense on the
result, so an attack never decides by itself whether it succeeded. ``perturb_with_history``
(what the runner calls) also returns the attack's convergence evidence (convergence.py), None
for attacks that record none; ``check_target`` refuses, in one line and before any heavy work,
a defense or gradient mode the attack cannot run against, and ``applies_to`` asks the same
question without raising (a suite skips the members that cannot run)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import UserError
from .convergence import AttackHistory

if TYPE_CHECKING:
    from ..defenses.base import Defense


class Attack:
    norm: str
    eps: float
    steps: int | None
    seed: int

    @property
    def name(self) -> str:
        raise NotImplementedError

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def check_target(self, gradient: str, defense: Any) -> None:
        """Raise a one-line UserError if the attack cannot run against ``defense`` (a Defense or
        its class) under the gradient mode ``gradient``; most attacks run against anything."""

    def perturb_with_history(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
    ) -> tuple[torch.Tensor, AttackHistory | None]:
        """The adversarial examples and what the attack saw per iteration (None: nothing recorded)."""
        return self.perturb(model, x, y, progress), None

    def applies_to(self, defense: "Defense", gradient: str) -> bool:
        """Whether ``check_target`` lets the attack run against ``defense`` with ``gradient``."""
        try:
            self.check_target(gradient, defense)
        except UserError:
            return False
        return True

    def replace(self, **changes: Any) -> "Attack":
        return dataclasses.replace(self, **changes)


@contextmanager
def isolated_global_rng(device: torch.device) -> Iterator[None]:
    """Library attacks reseed the global RNG (AutoAttack, torchattacks' APGD): restore it after,
    so they change neither the caller's stream nor, since defenses draw from their own
    generators, any defense's noise."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield
