"""PGD with Expectation over Transformation (Lee & Kim, ICCV 2023 protocol), own implementation.

Each iteration differentiates the cross-entropy summed over ``eot`` stochastic forward passes.
The EOT samples run as ONE batched pass (the batch repeated ``eot`` times), not a Python loop.
Linf takes sign steps; L2 takes steps along the L2-normalised gradient and projects onto the
L2 ball (the reference takes sign steps for L2 too, a known weakness). The final iterate is
returned, as in the reference.

History (convergence.py): one record per iterate, the start point first; the returned (last)
iterate is checked by one more, forward-only pass of its EOT copies after the last step (``eot``
purifications per image; the examples stay those of the plain loop). Since the last iterate is
returned, a record's "best iterate so far" is that record's iterate: ``robust`` is the attack's
own check of it (more than half its EOT copies classified correctly, as APGD-EOT's),
``best_loss`` its cross-entropy averaged over the copies, ``step_size`` the constant step. With
no step there is nothing to check: no model call, no history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .base import Attack
from .convergence import AttackHistory
from .threat import NORMS, project, uniform_in_ball


@dataclass(frozen=True)
class PGDEOT(Attack):
    norm: str = "Linf"
    eps: float = 8 / 255
    step_size: float = 0.007
    steps: int = 200
    eot: int = 20
    random_start: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}: choose Linf or L2")
        if self.eps < 0 or self.steps < 0 or self.eot < 1 or self.step_size < 0:
            raise UserError("PGD-EOT needs eps >= 0, steps >= 0, eot >= 1 and step_size >= 0")

    @property
    def name(self) -> str:
        return f"PGD-EOT({self.norm}, {self.steps} steps, EOT {self.eot})"

    def eot_pass(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, gradient: bool = True):
        """One batched pass of the ``eot`` copies of the [0,1] iterates: per image the
        cross-entropy averaged over the copies and the attack's own check (more than half the
        copies classified correctly), and the gradient of the cross-entropy summed over the
        batch and the copies (None without ``gradient``: a forward pass only)."""
        x_adv = x_adv.detach().requires_grad_(gradient)
        labels = y.repeat(self.eot)
        with torch.set_grad_enabled(gradient):
            logits = model(x_adv.repeat(self.eot, 1, 1, 1))
        grad = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x_adv)[0] if gradient else None
        logits = logits.detach()
        loss = F.cross_entropy(logits, labels, reduction="none").view(self.eot, -1).mean(0)
        correct = (logits.argmax(1) == labels).view(self.eot, -1).float().mean(0) > 0.5
        return loss, grad, correct

    def ascent_step(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.step_size * grad / norms

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Adversarial examples for [0,1] images ``x`` with labels ``y`` against ``model``."""
        return self.perturb_with_history(model, x, y, progress)[0]

    def perturb_with_history(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False,
    ) -> tuple[torch.Tensor, AttackHistory | None]:
        """The adversarial examples (the last iterate) and the check of every iterate, the
        returned one last (``steps + 1`` records; None for 0 steps)."""
        x = x.detach()
        x_adv = x.clone()
        if self.random_start and self.eps > 0:
            generator = torch.Generator(x.device).manual_seed(self.seed)
            x_adv = project(x + uniform_in_ball(x, self.norm, self.eps, generator), x, self.norm, self.eps)
        if self.steps == 0:
            return x_adv.detach(), None
        records = []
        for i in tqdm(range(self.steps + 1), desc="PGD-EOT", leave=False, disable=not progress):
            loss, grad, robust = self.eot_pass(model, x_adv, y, gradient=i < self.steps)
            records.append((robust, loss))
            if grad is not None:
                x_adv = project(x_adv.detach() + self.ascent_step(grad), x, self.norm, self.eps)
        robust, loss = (torch.stack(column) for column in zip(*records))
        return x_adv.detach(), AttackHistory(robust=robust, best_loss=loss, step_size=torch.full_like(loss, self.step_size))
