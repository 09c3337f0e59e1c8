"""DiffAttack (Kang et al., NeurIPS 2023): APGD-EOT on L = L_cls + lambda L_dev.

L_dev, the deviated-reconstruction loss, is per image the mean over reverse steps t of the
per-pixel mean squared error between the reverse-process state x'_t and the forward-diffused
input x_t = sqrt(abar_t)(2x - 1) + sqrt(1 - abar_t) eps, with the same eps as the forward noising
and x_t detached (a target); maximising it pushes the reconstruction away from the input.
lambda = 1 (ATTACKS.md: 0.1 and 10 are weaker). Two APGD rounds: L_cls = CE, then DLR from the
first round's best iterate. The states come from the defense's ``deviation_states`` hook, in the
same pass as its purification, so L_dev costs no network call: its gradient rides on the same
backward pass through the checkpointed sampler loop (O(1) activations in the number of steps).

Choices where ATTACKS.md leaves room, each for a reason:
- L_dev averages over every state the sampler loop visits after its start (there x'_t = x_t by
  construction): they are computed anyway; ``sampled_steps`` k keeps k of them evenly spaced,
  always the same ones, so that every iteration optimises the same objective;
- the APGD machinery is APGDEOT's (attacks/apgd.py: batched EOT copies, per-image step-size
  checkpoints, best iterate per image), with its documented differences from the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..defenses.base import Defense, DeviationStates
from ..errors import UserError
from .apgd import APGDEOT
from .base import Attack
from .convergence import AttackHistory
from .gradients import check_deviation_states
from .losses import loss_function


def state_indices(n_states: int, sampled: int | None = None) -> list[int]:
    """The loop states (by index, 0 the start) L_dev averages over: every one after the start,
    or ``sampled`` of them evenly spaced back from the last one (the last always included)."""
    after_start = n_states - 1
    if after_start < 1:
        raise ValueError(f"L_dev needs a state after the start, got {n_states} state(s)")
    k = after_start if sampled is None else min(sampled, after_start)
    return sorted(n_states - 1 - (i * after_start) // k for i in range(k))


def deviation_loss(states: DeviationStates, sampled: int | None = None) -> torch.Tensor:
    """L_dev per row (B,): the mean over the chosen states (``state_indices``) of the per-pixel
    mean squared error between x'_t and the detached x_t, both in [-1, 1]."""
    terms = [
        (states.reverse[i] - states.diffused(i).detach()).pow(2).flatten(1).mean(1)
        for i in state_indices(len(states.reverse), sampled)
    ]
    return torch.stack(terms).mean(0)


@dataclass(frozen=True)
class DeviationAPGD(APGDEOT):
    """One APGD round on L_cls + lam * L_dev: APGDEOT with its per-copy loss replaced."""

    lam: float = 1.0
    sampled_steps: int | None = None

    def copy_loss(self, model: nn.Module, copies: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = model.deviation_states(copies)
        logits = model.classifier(states.purified)  # the defense's prediction (Defense.deviation_states)
        loss = loss_function(self.loss)(logits, labels) + self.lam * deviation_loss(states, self.sampled_steps)
        return loss, logits


@dataclass(frozen=True)
class DiffAttack(Attack):
    """``steps`` iterations per round; ``losses`` the rounds' L_cls, each round from the last
    one's best iterate; ``restarts`` per round (the first from that iterate, the others random)."""

    norm: str = "Linf"
    eps: float = 8 / 255
    steps: int = 100
    eot: int = 20
    lam: float = 1.0
    losses: tuple[str, ...] = ("ce", "dlr")
    sampled_steps: int | None = None
    restarts: int = 1
    rho: float = 0.75
    seed: int = 0

    def __post_init__(self):
        losses = self.losses.split(",") if isinstance(self.losses, str) else self.losses
        try:
            losses = tuple(str(name).strip() for name in losses)
        except TypeError:
            raise UserError(f"diffattack losses must be a list of loss names (e.g. ce,dlr), got {self.losses!r}") from None
        object.__setattr__(self, "losses", losses)  # a list from YAML: keep the attack hashable
        if not losses:
            raise UserError("diffattack needs at least one round: losses e.g. ce,dlr")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam >= 0:
            raise UserError(f"diffattack lam must be a number >= 0, got {self.lam!r}")
        sampled = self.sampled_steps
        if sampled is not None and (isinstance(sampled, bool) or not isinstance(sampled, int) or sampled < 1):
            raise UserError(f"diffattack sampled_steps must be an integer >= 1 (or unset: every step), got {sampled!r}")
        self.rounds()  # APGDEOT checks the rest (norm, loss names, steps, eot, restarts, rho)

    def rounds(self) -> list[DeviationAPGD]:
        return [
            DeviationAPGD(norm=self.norm, eps=self.eps, loss=loss, steps=self.steps, eot=self.eot, restarts=self.restarts,
                          rho=self.rho, seed=self.seed, lam=self.lam, sampled_steps=self.sampled_steps)
            for loss in self.losses
        ]

    @property
    def name(self) -> str:
        restarts = f"{self.restarts} restart" + ("s" if self.restarts > 1 else "")
        sampled = f", L_dev on {self.sampled_steps} steps" if self.sampled_steps is not None else ""
        rho = f", rho {self.rho:g}" if self.rho != 0.75 else ""
        return (f"DiffAttack({self.norm}, {' then '.join(self.losses)}, lambda {self.lam:g}, {self.steps} iter, "
                f"EOT {self.eot}, {restarts}{sampled}{rho})")

    def check_target(self, gradient: str, defense: Defense | type[Defense]) -> None:
        check_deviation_states(gradient, defense)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Adversarial examples for [0,1] images ``x`` with labels ``y`` against the defense ``model``."""
        return self.perturb_with_history(model, x, y, progress)[0]

    def perturb_with_history(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
    ) -> tuple[torch.Tensor, AttackHistory]:
        """The adversarial examples and the rounds' histories one after the other (APGDEOT's
        records; ``best_loss`` is each round's own objective)."""
        if not isinstance(model, Defense):
            raise UserError(f"diffattack needs the defense itself (its reverse-process states), not {type(model).__name__}: "
                            "use gradient 'full' or 'surrogate:K'")
        x_adv, histories = None, []
        for attack in self.rounds():
            x_adv, history = attack.perturb_with_history(model, x, y, progress, start=x_adv)
            histories.append(history)
        return x_adv, AttackHistory(
            robust=torch.cat([h.robust for h in histories]),
            best_loss=torch.cat([h.best_loss for h in histories]),
            step_size=torch.cat([h.step_size for h in histories]),
        )
