"""DiffPure (Nie et al., ICML 2022): diffuse the input to t*, then run the reverse process to 0."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..diffusion.noise import Generators, randn_like
from ..diffusion.sampling import NetworkCaller, OnState, ddim_transition, sample_loop
from ..diffusion.schedule import CLEAN, ddpm_step, q_sample_with_noise, timestep_grid
from ..diffusion.vp_sde import VPSDE, solver_times
from ..errors import UserError
from .base import Defense, DeviationStates, StateLog

SAMPLERS = ("ddpm", "ddim", "sde")
SDE_FORWARDS = ("discrete", "continuous")
SDE_TIME_LABELS = ("continuous", "rounded")


@dataclass(frozen=True)
class DiffPureConfig:
    """t_star is continuous time (0.1 for Linf 8/255, 0.075 for L2 0.5): step round(t_star * 1000).

    sampler: "ddpm" (ancestral, posterior variance; calls at t_start..0: t_start + 1 calls),
    "ddim" (eta = 0 on a grid of stride ``ddim_stride``: ceil(t_start / stride) calls) or
    "sde" (Euler-Maruyama on the reverse VP-SDE from t_star to ``sde_t_end`` with dt = ``sde_dt``
    and a shorter last step: ceil((t_star - t_end) / dt) calls).

    The "sde" settings default to DiffPure's code: ``sde_forward`` "discrete" diffuses with the
    discrete alpha_bar at index t_start - 1 (0.89702 for t* = 0.1), "continuous" with the
    VP-SDE's alpha_bar(t*) (0.8963); ``sde_time_label`` "continuous" calls the network with
    999 t (score_sde's continuous label), "rounded" with round(1000 t); ``sde_t_end`` 1e-5 stops
    where DiffPure stops (0 runs the last step to t = 0). The score is -eps / std(t) with the
    continuous std either way. ``clamp`` clamps the purified image to [0, 1] (the defense
    interface's promise; DiffPure's code hands the classifier the unclamped (x + 1) / 2).
    """

    t_star: float = 0.1
    sampler: str = "ddpm"
    ddim_stride: int = 1
    sde_dt: float = 1e-3
    sde_t_end: float = 1e-5
    sde_forward: str = "discrete"
    sde_time_label: str = "continuous"
    clamp: bool = True

    def __post_init__(self):
        for name, value, choices in (
            ("sampler", self.sampler, SAMPLERS),
            ("sde_forward", self.sde_forward, SDE_FORWARDS),
            ("sde_time_label", self.sde_time_label, SDE_TIME_LABELS),
        ):
            if value not in choices:
                raise UserError(f"unknown DiffPure {name} {value!r}: choose one of {', '.join(choices)}")
        if not 0 < self.t_star < 1:
            raise UserError(f"DiffPure t_star must be in (0, 1), got {self.t_star}")
        if not self.sde_dt > 0 or not 0 <= self.sde_t_end < self.t_star:
            raise UserError(
                f"DiffPure needs sde_dt > 0 and 0 <= sde_t_end < t_star, "
                f"got sde_dt={self.sde_dt}, sde_t_end={self.sde_t_end}, t_star={self.t_star}"
            )

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
        return len(self._sde_times()) - 1

    def surrogate(self, network_calls: int) -> Defense:
        """DDIM from the same t_start with about ``network_calls`` calls."""
        return self.replace(sampler="ddim", ddim_stride=math.ceil(self.config.t_start / network_calls))

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        return self._purify(x01)[0]

    def deviation_states(self, x01: torch.Tensor) -> DeviationStates:
        """The states of the one reverse loop: ddpm at t_start, t_start - 1, ..., 0 and the clean
        image; ddim at its strided grid; sde at the solver's times, with the VP-SDE's continuous
        alpha_bar (with ``sde_forward`` "discrete" the start was diffused with the discrete
        alpha_bar, so there x_t and x'_t differ by that small difference)."""
        log = StateLog()
        purified, noise = self._purify(x01, log)
        alpha_bar = VPSDE().alpha_bar if self.config.sampler == "sde" else self.schedule.alpha_bar
        return log.deviation_states(purified, x01, noise, alpha_bar)

    def _purify(self, x01: torch.Tensor, on_state: OnState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The purified [0,1] images and the forward noise; ``on_state`` sees the loop's states."""
        g = self.generator(x01)
        x, noise = self._diffuse(x01 * 2 - 1, g)
        eps_fn = NetworkCaller(self.diffusion)
        c = self.config
        if c.sampler == "sde":
            x = self._reverse_sde(x, eps_fn, g, on_state)
        elif c.sampler == "ddim":
            x = sample_loop(x, timestep_grid(c.t_start, c.ddim_stride), ddim_transition(self.schedule, eps_fn), on_state)
        else:
            grid = list(range(c.t_start, -1, -1)) + [CLEAN]
            x = sample_loop(x, grid, lambda x, t, s: ddpm_step(self.schedule, x, t, eps_fn(x, t), g), on_state)
        x01 = (x + 1) / 2
        return (x01.clamp(0, 1) if c.clamp else x01), noise

    def stages(self, x01: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Purified, and the input diffused to t_start (shown in [0,1])."""
        purified = self.purify(x01)
        noised, _ = self._diffuse(x01 * 2 - 1, self.generator(x01))
        return [("purified", purified), (f"noised t={self.config.t_start}", ((noised + 1) / 2).clamp(0, 1))]

    def _diffuse(self, x0: torch.Tensor, g: Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 in [-1, 1] diffused to where the reverse process starts, and the noise it took."""
        c = self.config
        if c.sampler != "sde":
            return q_sample_with_noise(self.schedule, x0, c.t_start, g)
        if c.sde_forward == "discrete":
            # DiffPure's index t_start - 1: alpha_bar(i) includes step i, i.e. time (i + 1) / 1000.
            abar = self.schedule.alpha_bar(c.t_start - 1).item()
        else:
            abar = VPSDE().alpha_bar(c.t_star)
        noise = randn_like(x0, g)
        return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise, noise

    def _sde_times(self) -> list[float]:
        c = self.config
        return solver_times(c.t_star, c.sde_t_end, c.sde_dt)

    def _reverse_sde(self, x: torch.Tensor, eps_fn, g: Generators, on_state: OnState | None = None) -> torch.Tensor:
        sde = VPSDE()
        label = sde.continuous_label if self.config.sde_time_label == "continuous" else sde.network_index

        def step(x, t, s):
            eps = eps_fn(x, label(t))
            return sde.reverse_em_step(x, t, t - s, eps, randn_like(x, g))

        return sample_loop(x, self._sde_times(), step, on_state)
