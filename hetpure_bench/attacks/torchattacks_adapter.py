"""Any torchattacks attack by class name (EOTPGD, APGD, CW, FGSM, ...) through one adapter.

Every result is projected back into the threat model's ball: CW minimises the perturbation
without a budget, and a benchmark must never count an example outside the ball.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .base import Attack, isolated_global_rng
from .threat import NORMS, project

# The norm an attack class is built for (None: it takes a ``norm`` argument). CW is an L2
# minimal-perturbation attack; its output is projected onto the eps-ball.
NATIVE_NORM = {"EOTPGD": "Linf", "PGD": "Linf", "FGSM": "Linf", "PGDL2": "L2", "CW": "L2", "APGD": None, "APGDT": None}


def attack_class(name: str) -> type:
    import torchattacks

    cls = getattr(torchattacks, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchattacks.attack.Attack)) or name == "Attack":
        known = [n for n in dir(torchattacks) if isinstance(getattr(torchattacks, n), type) and n[0].isupper()]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown torchattacks attack {name!r}{hint} (e.g. EOTPGD, APGD, CW, FGSM)")
    return cls


@dataclass(frozen=True)
class TorchAttack(Attack):
    attack: str = "EOTPGD"
    norm: str = "Linf"
    eps: float = 8 / 255
    steps: int | None = None  # None: torchattacks' default, or a one-step attack
    params: tuple[tuple[str, object], ...] = ()  # further constructor arguments
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}: choose Linf or L2")
        accepted = inspect.signature(attack_class(self.attack)).parameters
        native = NATIVE_NORM.get(self.attack)
        if native is not None and native != self.norm and self.attack != "CW":
            raise UserError(f"torchattacks {self.attack} is an {native} attack; run it with threat {native}")
        unknown = [k for k, _ in self.params if k not in accepted or k in ("model", "eps", "norm", "seed", "steps")]
        if self.steps is not None and "steps" not in accepted:
            unknown.append("steps")
        if unknown:
            raise UserError(f"torchattacks {self.attack} takes no setting(s) {', '.join(unknown)}")

    @classmethod
    def from_settings(cls, norm: str, eps: float, seed: int, attack: str = "EOTPGD", steps: int | None = None, **params) -> "TorchAttack":
        return cls(attack=attack, norm=norm, eps=eps, steps=steps, params=tuple(sorted(params.items())), seed=seed)

    @property
    def name(self) -> str:
        settings = ([f"steps={self.steps}"] if self.steps is not None else []) + [f"{k}={v}" for k, v in self.params]
        projected = " projected to the eps-ball" if self.attack == "CW" else ""
        return f"torchattacks.{self.attack}({', '.join(settings)}){projected}"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        cls = attack_class(self.attack)
        accepted = inspect.signature(cls).parameters
        kwargs = dict(self.params)
        for key, value in (("eps", self.eps), ("norm", self.norm), ("seed", self.seed), ("steps", self.steps)):
            if key in accepted and value is not None:
                kwargs[key] = value
        with isolated_global_rng(x.device):
            torch.manual_seed(self.seed)  # torchattacks draws random starts from the global RNG
            x_adv = cls(model, **kwargs)(x.detach(), y)
        return project(x_adv.detach(), x, self.norm, self.eps)
