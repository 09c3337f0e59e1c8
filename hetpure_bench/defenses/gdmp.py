"""GDMP (Wang et al., 2022): guided DDPM purification.

One iteration: diffuse the current image to step t_guide - 1, then t_guide ancestral steps back
(calls at t_guide - 1 .. 0). At each step the posterior mean gets the guidance
var_t * s_t * grad_{x_t} sim(x_t, q(x_input)_t) with a fresh noisy copy of the input, where
s_t = scale * (3 * 255 / (2 * ptb)) * sqrt(1 - abar_t) / sqrt(abar_t) and sim is SSIM (scale
70000) or minus the per-image mean squared error (scale 60000). ``iterations`` iterations per
path; ``paths`` independent paths whose logits are averaged.

Full gradients include the guidance term's dependence on the input (second-order backprop:
the guidance gradient is taken with create_graph while an attack records a graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..diffusion.sampling import NetworkCaller, sample_loop
from ..diffusion.schedule import CLEAN, VPSchedule, ddpm_mean_variance, q_sample
from ..errors import UserError
from ..noise import randn_like
from ..ssim import ssim
from .base import Defense

SIMILARITIES = {"ssim": 70000.0, "mse": 60000.0}


def guidance_scale(schedule: VPSchedule, t: int, scale: float, ptb: float) -> float:
    """s_t = scale * (3 * 255 / (2 * ptb)) * sqrt(1 - abar_t) / sqrt(abar_t)."""
    abar = schedule.alpha_bar(t).item()
    return scale * (3 * 255 / (2 * ptb)) * math.sqrt(1 - abar) / math.sqrt(abar)


def similarity(kind: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image similarity of [-1,1] images: SSIM (on the [0,1] scale) or minus the mean squared error."""
    if kind == "ssim":
        return ssim((x + 1) / 2, (target + 1) / 2)
    return -(x - target).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class GDMPConfig:
    t_guide: int = 36
    iterations: int = 4
    paths: int = 10
    similarity: str = "ssim"
    scale: float | None = None  # None: 70000 for SSIM, 60000 for MSE
    ptb: float = 8.0  # the attack budget in /255 units, as in GDMP's scale formula

    def __post_init__(self):
        if self.similarity not in SIMILARITIES:
            raise UserError(f"GDMP similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if not 1 <= self.t_guide <= 1000 or self.iterations < 1 or self.paths < 1 or self.ptb <= 0:
            raise UserError("GDMP needs 1 <= t_guide <= 1000, iterations >= 1, paths >= 1 and ptb > 0")

    @property
    def guide_scale(self) -> float:
        return self.scale if self.scale is not None else SIMILARITIES[self.similarity]


class GDMP(Defense):
    name = "gdmp"
    config_class = GDMPConfig

    @property
    def nfe(self) -> int:
        """iterations * t_guide calls per path, times ``paths`` paths per prediction."""
        c = self.config
        return c.iterations * c.t_guide * c.paths

    def surrogate(self, network_calls: int) -> Defense:
        """One path, one iteration, with t_guide = network_calls (a much weaker purifier)."""
        return self.replace(paths=1, iterations=1, t_guide=min(network_calls, self.config.t_guide))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        paths = self.config.paths
        logits = self.classifier(self.purify(x01.repeat(paths, 1, 1, 1)))  # all paths in one batch
        return logits.view(paths, x01.shape[0], -1).mean(0)

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        """One path: ``iterations`` guided diffuse-and-denoise rounds; [0,1] in and out."""
        c, schedule, g = self.config, self.schedule, self.generator(x01)
        target = x01 * 2 - 1
        eps_fn = NetworkCaller(self.diffusion)
        grid = list(range(c.t_guide - 1, -1, -1)) + [CLEAN]
        x = target
        for _ in range(c.iterations):
            x = q_sample(schedule, x, c.t_guide - 1, g)
            x = sample_loop(x, grid, lambda x, t, s: self._guided_step(x, t, target, eps_fn, g))
        return ((x + 1) / 2).clamp(0, 1)

    def _guided_step(self, x, t, target, eps_fn, g):
        c, schedule = self.config, self.schedule
        # The clipped posterior variance keeps the last step (t = 0) guided; it adds no noise.
        mean, var = ddpm_mean_variance(schedule, x, t, eps_fn(x, t), variance="clipped")
        noisy_target = q_sample(schedule, target, t, g)
        recording = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            x_in = x if recording else x.detach().requires_grad_(True)
            sim = similarity(c.similarity, x_in, noisy_target).sum()
            grad, = torch.autograd.grad(sim, x_in, create_graph=recording)
        mean = mean + var * guidance_scale(schedule, t, c.guide_scale, c.ptb) * grad
        return mean + var.sqrt() * randn_like(x, g) if t > 0 else mean
