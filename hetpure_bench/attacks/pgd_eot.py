"""PGD with Expectation over Transformation (Lee & Kim, ICCV 2023 protocol), own implementation.

Each iteration differentiates the cross-entropy summed over ``eot`` stochastic forward passes.
The EOT samples run as ONE batched pass (the batch repeated ``eot`` times), not a Python loop.
Linf takes sign steps; L2 takes steps along the L2-normalised gradient and projects onto the
L2 ball (the reference takes sign steps for L2 too, a known weakness). The final iterate is
returned, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .base import Attack
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

    def eot_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over the batch and over ``eot`` batched stochastic passes."""
        logits = model(x.repeat(self.eot, 1, 1, 1))
        return F.cross_entropy(logits, y.repeat(self.eot), reduction="sum")

    def ascent_step(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.step_size * grad / norms

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Adversarial examples for [0,1] images ``x`` with labels ``y`` against ``model``."""
        x = x.detach()
        x_adv = x.clone()
        if self.random_start and self.eps > 0:
            generator = torch.Generator(x.device).manual_seed(self.seed)
            x_adv = project(x + uniform_in_ball(x, self.norm, self.eps, generator), x, self.norm, self.eps)
        for _ in tqdm(range(self.steps), desc="PGD-EOT", leave=False, disable=not progress):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(self.eot_loss(model, x_adv, y), x_adv)
            x_adv = project(x_adv.detach() + self.ascent_step(grad), x, self.norm, self.eps)
        return x_adv.detach()
