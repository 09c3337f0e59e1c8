"""APGD with Expectation over Transformation (Croce & Hein, ICML 2020), own implementation.

Per iteration ONE batched pass of ``eot`` copies (``x.repeat(eot, 1, 1, 1)``); the per-image loss
(ce, margin or dlr, attacks/losses.py) is averaged over the copies and drives both the gradient and
the step-size decisions. From a random start uniform in the eps-ball: a first step of 2 eps
(Linf: along the gradient's sign, L2: along the L2-normalised gradient), then steps with
momentum 0.75. Per image, at the checkpoints (22%, 41%, 57%, 70%, 80%, 87%, 93% and 99% of the
iterations) the step is halved and the iterate restarts from the best one when at most
rho x interval of the steps since the last checkpoint raised the loss, or when the step was not
halved at the last checkpoint and the best loss has not risen since. Each restart starts from a
new random point; the highest-loss iterate per image over all restarts is returned.

Differences from the original code (pyautoattack's APGDAttack), each for a reason:
- the loss of an iterate is the mean over its EOT copies, not the last copy's;
- every restart attacks every image (the original re-attacks only those its own check has not
  broken): the rows of a batch must stay the images, so that each keeps its noise stream;
- the highest-loss iterate is returned (the original returns the last iterate its noisy check
  saw misclassified, or the clean image);
- the first interval counts its increases against the start point's loss (the original
  compares the first step's loss with 0, an indexing slip);
- the random start is uniform in the ball (the original's lies on its surface; in 3072
  dimensions nearly the same point cloud).
The original itself runs through ``--attack autoattack`` or ``torchattacks`` (attack=APGD).
"""

# Our own code, not pyautoattack's or torchattacks' APGD: both run EOT as ``eot`` separate model
# calls per step, re-attack shrinking subsets of the batch on restarts (rows that no longer match
# images, so their noise falls back to a shared stream, noise.py), reseed the global RNG, have no
# margin loss, and record nothing per iteration, where we need the per-iteration robust check.

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .base import Attack
from .convergence import AttackHistory
from .losses import loss_function
from .threat import NORMS, project, uniform_in_ball

MOMENTUM = 0.75
INITIAL_STEP = 2.0  # x eps


def step_size_checkpoints(n_iter: int) -> list[int]:
    """The iteration counts after which the step size is checked: a first interval of 22% of the
    iterations, each next one 3% shorter but at least 6%, in whole iterations as the original code
    rounds them (100 iterations: 22, 41, 57, 70, 80, 87, 93, 99). A check after the last iteration
    would change nothing and is left out."""
    interval = max(int(0.22 * n_iter), 1)
    shrink, shortest = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    points, at = [], interval
    while at < n_iter:
        points.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return points


def should_halve(
    increases: torch.Tensor, interval: int, rho: float,
    reduced_last: torch.Tensor, best: torch.Tensor, best_last: torch.Tensor,
) -> torch.Tensor:
    """Per image (B,): halve the step at a checkpoint when at most ``rho * interval`` of the
    ``interval`` steps since the last checkpoint raised the loss (``increases``; the original
    code's <=, the paper writes <), or when the step was not halved at the last checkpoint
    (``reduced_last``) and the best loss has not risen since (``best`` <= ``best_last``)."""
    return (increases <= rho * interval) | (~reduced_last & (best <= best_last))


def _keep_better(better: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """Per image, the entries of the tensors ``new`` where ``better`` (B,), else those of ``old``."""
    return tuple(torch.where(better.view(-1, *[1] * (n.dim() - 1)), n, o) for n, o in zip(new, old))


@dataclass
class StepSizeSchedule:
    """One restart's per-image step size (B,) and what its checkpoints decide on: the restart's
    best iterate so far by loss (``best``: iterate, loss, gradient), the steps that raised the loss
    since the last checkpoint, whether that checkpoint halved the step and the best loss then.
    Shared by APGD-EOT and DiffHammer, which step the same way from different gradients."""

    step_size: torch.Tensor
    checkpoints: frozenset[int]
    rho: float
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    increases: torch.Tensor = field(init=False)
    reduced_last: torch.Tensor = field(init=False)
    best_last: torch.Tensor = field(init=False)
    last_check: int = 0

    def __post_init__(self):
        loss = self.best[1]
        self.increases, self.reduced_last, self.best_last = torch.zeros_like(loss), torch.ones_like(loss, dtype=torch.bool), loss

    @classmethod
    def start(cls, x_adv: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, eps: float, steps: int, rho: float) -> "StepSizeSchedule":
        """The schedule of a restart of ``steps`` iterations from ``x_adv`` (its loss (B,) and
        gradient): a first step of INITIAL_STEP x eps, the checkpoints of step_size_checkpoints."""
        return cls(torch.full_like(loss, INITIAL_STEP * eps), frozenset(step_size_checkpoints(steps)), rho, (x_adv, loss, grad))

    def observe(self, x_adv: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, last_loss: torch.Tensor) -> None:
        """A step reached ``x_adv`` with ``loss`` and ``grad``: count where it raised the loss
        above ``last_loss`` and keep the better iterate per image."""
        self.increases = self.increases + (loss > last_loss)
        self.best = _keep_better(loss > self.best[1], (x_adv, loss, grad), self.best)

    def checkpoint(self, i: int, x_adv: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After pass ``i`` (0: the start point): at a checkpoint, halve the step of the images
        should_halve picks and send them back to the best iterate, with its gradient. Returns the
        iterate and gradient to step from (``x_adv`` and ``grad`` where nothing changes)."""
        if i not in self.checkpoints:
            return x_adv, grad
        halve = should_halve(self.increases, i - self.last_check, self.rho, self.reduced_last, self.best[1], self.best_last)
        self.step_size = torch.where(halve, self.step_size / 2, self.step_size)
        x_adv, grad = _keep_better(halve, (self.best[0], self.best[2]), (x_adv, grad))
        self.reduced_last, self.best_last, self.increases, self.last_check = halve, self.best[1], torch.zeros_like(self.increases), i
        return x_adv, grad


@dataclass(frozen=True)
class APGDEOT(Attack):
    norm: str = "Linf"
    eps: float = 8 / 255
    loss: str = "margin"
    steps: int = 100
    eot: int = 20
    restarts: int = 1
    rho: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}: choose Linf or L2")
        loss_function(self.loss)
        if self.eps < 0 or self.steps < 0 or self.eot < 1 or self.restarts < 1 or not 0 <= self.rho <= 1:
            raise UserError("APGD-EOT needs eps >= 0, steps >= 0, eot >= 1, restarts >= 1 and 0 <= rho <= 1")

    @property
    def name(self) -> str:
        return f"APGD-EOT({', '.join(self.name_fields())})"

    def name_fields(self) -> list[str]:
        """The settings a row's label states (an attack built on this one adds its own)."""
        restarts = f"{self.restarts} restart" + ("s" if self.restarts > 1 else "")
        rho = [f"rho {self.rho:g}"] if self.rho != 0.75 else []
        return [self.norm, self.loss, f"{self.steps} iter", f"EOT {self.eot}", restarts, *rho]

    def copy_loss(self, model: nn.Module, copies: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss per row of the batched EOT copies ([0,1] images) and their logits (the
        attack's own check). The hook an attack on another objective overrides (DiffAttack)."""
        logits = model(copies)
        return loss_function(self.loss)(logits, labels), logits

    def eot_pass(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor):
        """One batched pass of the EOT copies of the [0,1] iterates: per image the loss averaged
        over the copies, its gradient, and the attack's own check (more than half the copies
        classified correctly)."""
        x_adv = x_adv.detach().requires_grad_(True)
        labels = y.repeat(self.eot)
        loss, logits = self.copy_loss(model, x_adv.repeat(self.eot, 1, 1, 1), labels)
        loss = loss.view(self.eot, -1).mean(0)
        grad, = torch.autograd.grad(loss.sum(), x_adv)
        correct = (logits.detach().argmax(1) == labels).view(self.eot, -1).float().mean(0) > 0.5
        return loss.detach(), grad.detach(), correct

    def constrain(self, model: nn.Module, x_from: torch.Tensor, x_next: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Where the attack lets an iterate go: ``x_next`` (already in the ball and the box),
        reached from the iterate ``x_from`` (the clean images ``x`` for a restart's start point).
        APGD's feasible set is the whole ball; an attack with a narrower one
        (MaskAvoidingAPGD) projects onto it here."""
        return x_next

    def step(self, x_adv, x_prev, grad, step_size, x, momentum: float) -> torch.Tensor:
        """The next iterate: a projected step from ``x_adv``, then mixed with the last move."""
        if self.norm == "Linf":
            direction = grad.sign()
        else:
            direction = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
        z = project(x_adv + step_size.view(-1, 1, 1, 1) * direction, x, self.norm, self.eps)
        return project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, self.norm, self.eps)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Adversarial examples for [0,1] images ``x`` with labels ``y`` against ``model``."""
        return self.perturb_with_history(model, x, y, progress)[0]

    def perturb_with_history(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttackHistory]:
        """The adversarial examples and what the attack saw: one record per model pass (each
        restart's start point, then each iteration), restarts one after the other. ``start``
        (optional, [0,1] images in the ball): where the first restart starts instead of a random
        point (a later round of a multi-round attack continues from the earlier one's result)."""
        x = x.detach()
        generator = torch.Generator(x.device).manual_seed(self.seed)
        # The best iterate over all restarts: (x_adv, loss, robust) per image.
        best = (x, torch.full(y.shape, float("-inf"), device=x.device), torch.ones_like(y, dtype=torch.bool))
        records = []
        with tqdm(total=self.restarts * (self.steps + 1), desc="APGD-EOT", leave=False, disable=not progress) as bar:
            for restart in range(self.restarts):
                given = start if restart == 0 else None
                for x_adv, loss, robust, step_size in self.iterates(model, x, y, generator, given):
                    best = _keep_better(loss > best[1], (x_adv, loss, robust), best)
                    records.append((best[2], best[1], step_size))
                    bar.update()
        robust, best_loss, step_size = (torch.stack(column) for column in zip(*records))
        return best[0].detach(), AttackHistory(robust=robust, best_loss=best_loss, step_size=step_size)

    def iterates(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        start: torch.Tensor | None = None,
    ):
        """One restart from ``start`` (default: a random point of the ball): per model pass, the
        evaluated iterate, its loss and own check (B,), and the step size in force after the
        pass's checkpoint decision."""
        if start is None:
            start = x + uniform_in_ball(x, self.norm, self.eps, generator)
        x_adv = self.constrain(model, x, project(start.detach(), x, self.norm, self.eps), x)
        loss, grad, robust = self.eot_pass(model, x_adv, y)
        schedule = StepSizeSchedule.start(x_adv, loss, grad, self.eps, self.steps, self.rho)
        x_prev = x_adv
        for i in range(self.steps + 1):
            if i > 0:
                x_next = self.constrain(model, x_adv, self.step(x_adv, x_prev, grad, schedule.step_size, x, MOMENTUM if i > 1 else 1.0), x)
                x_prev, x_adv, last_loss = x_adv, x_next, loss
                loss, grad, robust = self.eot_pass(model, x_adv, y)
                schedule.observe(x_adv, loss, grad, last_loss)
            evaluated = x_adv
            x_adv, grad = schedule.checkpoint(i, x_adv, grad)
            yield evaluated, loss, robust, schedule.step_size
