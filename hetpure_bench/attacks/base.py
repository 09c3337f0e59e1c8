"""What every attack is: a frozen dataclass with ``norm``, ``eps``, ``steps`` (None for one-step
attacks) and ``seed`` fields, a ``name`` for result labels, and
``perturb(model, x01, y) -> x_adv01`` for [0,1] images. ``model`` is whatever the gradient mode
says the attacker differentiates (gradients.py); the runner evaluates the real defense on the
result, so an attack never decides by itself whether it succeeded."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import torch


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

    def check_gradient_mode(self, mode: str) -> None:
        """Raise a one-line UserError if the attack cannot follow gradient mode ``mode``
        (gradients.py); most attacks follow any. For the runner's checks before heavy work."""

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
