"""Sampling loops over an ``EpsModel``, written here rather than taken from diffusers pipelines
because those run under no_grad and attacks must differentiate through the loop."""

from __future__ import annotations

import torch

from .schedule import VPSchedule, ddim_step


def ddim_sample(model, schedule: VPSchedule, x_t: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x at ``grid[0]`` through each grid point to ``grid[-1]``.

    x_t is in [-1, 1]; one network call per step, so len(grid) - 1 calls.
    """
    x = x_t
    for t, s in zip(grid[:-1], grid[1:]):
        x = ddim_step(schedule, x, t, s, model(x, t))
    return x
