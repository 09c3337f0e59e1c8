"""The continuous VP-SDE (beta_min = 0.1, beta_max = 20), its reverse Euler-Maruyama step, the
time points of DiffPure's solver, and the time labels an eps-network is called with.

score_sde's continuous VP model was trained with the label 999 t for t in [0, 1]
(``continuous_label``); DiffPure calls it so, unrounded. ``network_index`` (round(1000 t),
clamped to 0..999) is the older harness convention, kept as an option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Slack when counting solver steps, so that (0.1 - 1e-5) / 1e-3 = 99.99 and 0.1 / 1e-3 =
# 100.00000000000001 (floating point) both give 100 steps.
_STEP_TOLERANCE = 1e-9


@dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_steps: int = 1000

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: float) -> float:
        return math.exp(-0.5 * t * t * (self.beta_max - self.beta_min) - t * self.beta_min)

    def std(self, t: float) -> float:
        """The continuous marginal std sqrt(1 - alpha_bar(t)) (score_sde's ``marginal_prob``)."""
        return math.sqrt(1.0 - self.alpha_bar(t))

    def continuous_label(self, t: float) -> float:
        """score_sde's time label for continuous VP models: (N - 1) t = 999 t, not rounded."""
        return (self.num_steps - 1) * t

    def network_index(self, t: float) -> int:
        """The rounded label round(N t), clamped to 0..N-1 (t* = 0.1 -> step 100)."""
        return min(max(round(t * self.num_steps), 0), self.num_steps - 1)

    def reverse_em_step(
        self, x: torch.Tensor, t: float, dt: float, eps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """One Euler-Maruyama step of the reverse SDE from t to t - dt, with score = -eps / std(t):
        x + (beta/2 x + beta * score) dt + sqrt(beta dt) z."""
        beta = self.beta(t)
        score = -eps / self.std(t)
        return x + (0.5 * beta * x + beta * score) * dt + math.sqrt(beta * dt) * noise


def solver_times(t_start: float, t_end: float, dt: float) -> list[float]:
    """The time points of a fixed-step solver from t_start down to t_end: t_start - k dt while
    above t_end, then t_end itself (a shorter last step), as torchsde lays out DiffPure's solve.

    E.g. (0.1, 1e-5, 1e-3) -> [0.1, 0.099, ..., 0.001, 1e-5]: 100 steps, the last of 0.99e-3.
    """
    steps = math.ceil((t_start - t_end) / dt - _STEP_TOLERANCE)
    return [t_start - k * dt for k in range(steps)] + [t_end]
