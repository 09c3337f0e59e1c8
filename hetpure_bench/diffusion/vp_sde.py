"""The continuous VP-SDE (beta_min = 0.1, beta_max = 20) and its reverse Euler-Maruyama step.

A discrete eps-network trained on the N = 1000 linear schedule is called at continuous time
t in (0, 1] with the integer index round(t * N), clamped to 0..N-1 (t* = 0.1 -> step 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_steps: int = 1000

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: float) -> float:
        return math.exp(-0.5 * t * t * (self.beta_max - self.beta_min) - t * self.beta_min)

    def network_index(self, t: float) -> int:
        return min(max(round(t * self.num_steps), 0), self.num_steps - 1)

    def reverse_em_step(
        self, x: torch.Tensor, t: float, dt: float, eps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """One Euler-Maruyama step of the reverse SDE from t to t - dt, with score = -eps / sigma(t):
        x + (beta/2 x + beta * score) dt + sqrt(beta dt) z."""
        beta = self.beta(t)
        score = -eps / math.sqrt(1.0 - self.alpha_bar(t))
        return x + (0.5 * beta * x + beta * score) * dt + math.sqrt(beta * dt) * noise
