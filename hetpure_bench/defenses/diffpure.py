"""DiffPure (Nie et al., ICML 2022): diffuse the input to t*, then run the reverse process to 0."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..diffusion.sampling import NetworkCaller, ddim_transition, sample_loop
from ..diffusion.schedule import CLEAN, ddpm_step, q_sample, timestep_grid
from ..diffusion.vp_sde import VPSDE
from ..errors import UserError
from ..noise import Generators, randn_like
from .base import Defense

SAMPLERS = ("ddpm", "ddim", "sde")


@dataclass(frozen=True)
class DiffPureConfig:
    """t_star is continuous time (0.1 for Linf 8/255, 0.075 for L2 0.5): step round(t_star * 1000).

    sampler: "ddpm" (ancestral, posterior variance; calls at t_start..0: t_start + 1 calls),
    "ddim" (eta = 0 on a grid of stride ``ddim_stride``: ceil(t_start / stride) calls) or
    "sde" (Euler-Maruyama on the reverse VP-SDE with dt = ``sde_dt``: t_star / dt calls).
    """

    t_star: float = 0.1
    sampler: str = "ddpm"
    ddim_stride: int = 1
    sde_dt: float = 1e-3

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown DiffPure sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if not 0 < self.t_star < 1:
            raise UserError(f"DiffPure t_star must be in (0, 1), got {self.t_star}")

    @property
    def t_start(self) -> int:
        return round(self.t_star * 1000)


class DiffPure(Defense):
    name = "diffpure"
    config_class = DiffPureConfig
    threat_defaults = {"L2": {"t_star": 0.075}}

    @property
    def nfe(self) -> int:
        c = self.config
        if c.sampler == "ddpm":
            return c.t_start + 1
        if c.sampler == "ddim":
            return math.ceil(c.t_start / c.ddim_stride)
        return round(c.t_star / c.sde_dt)

    def surrogate(self, network_calls: int) -> Defense:
        """DDIM from the same t_start with about ``network_calls`` calls."""
        return self.replace(sampler="ddim", ddim_stride=math.ceil(self.config.t_start / network_calls))

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        g = self.generator(x01)
        x0 = x01 * 2 - 1
        eps_fn = NetworkCaller(self.diffusion)
        c = self.config
        if c.sampler == "sde":
            x = self._reverse_sde(x0, eps_fn, g)
        else:
            x = q_sample(self.schedule, x0, c.t_start, g)
            if c.sampler == "ddim":
                x = sample_loop(x, timestep_grid(c.t_start, c.ddim_stride), ddim_transition(self.schedule, eps_fn))
            else:
                grid = list(range(c.t_start, -1, -1)) + [CLEAN]
                x = sample_loop(x, grid, lambda x, t, s: ddpm_step(self.schedule, x, t, eps_fn(x, t), g))
        return ((x + 1) / 2).clamp(0, 1)

    def stages(self, x01: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Purified, and the input diffused to t_start (shown in [0,1])."""
        purified = self.purify(x01)
        noised = q_sample(self.schedule, x01 * 2 - 1, self.config.t_start, self.generator(x01))
        return [("purified", purified), (f"noised t={self.config.t_start}", ((noised + 1) / 2).clamp(0, 1))]

    def _reverse_sde(self, x0: torch.Tensor, eps_fn, g: Generators) -> torch.Tensor:
        sde, c = VPSDE(), self.config
        abar = sde.alpha_bar(c.t_star)
        x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * randn_like(x0, g)
        steps = round(c.t_star / c.sde_dt)

        def step(x, i, _next):
            t = i * c.sde_dt
            eps = eps_fn(x, sde.network_index(t))
            return sde.reverse_em_step(x, t, c.sde_dt, eps, randn_like(x, g))

        return sample_loop(x, list(range(steps, -1, -1)), step)
