"""The one sampler loop, and the network caller every defense uses inside it.

Written here rather than taken from diffusers pipelines: those run under no_grad, and attacks
must differentiate through the whole loop.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from .schedule import VPSchedule, ddim_step

Step = Callable[[torch.Tensor, float, float], torch.Tensor]  # (x, t, s): integer steps or SDE times
OnState = Callable[[float, torch.Tensor], None]  # (t, x_t): the loop's state at a grid point

_CHECKPOINTING: ContextVar[bool] = ContextVar("activation_checkpointing", default=True)


@contextmanager
def activation_checkpointing(enabled: bool) -> Iterator[None]:
    """Within the block, network calls under a recorded gradient are checkpointed or not.

    On (the default): backward memory is flat in the number of steps, for one extra network
    forward per call. Off: the graph keeps every call's activations (memory grows with the
    steps), and backward skips the recomputation. The gradients are the same bit for bit.
    """
    token = _CHECKPOINTING.set(enabled)
    try:
        yield
    finally:
        _CHECKPOINTING.reset(token)


class NetworkCaller:
    """Calls an eps-model and counts the calls.

    When a gradient is being recorded, each call is wrapped in activation checkpointing (unless
    ``activation_checkpointing(False)`` is in effect), so the memory of a backward pass through
    the loop does not grow with the number of steps. The recomputation is exact: the network is
    deterministic (eval mode) and all sampler noise is drawn outside the checkpointed call from
    the defense's own generator.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: int | float) -> torch.Tensor:
        self.calls += 1
        if torch.is_grad_enabled() and x.requires_grad and _CHECKPOINTING.get():
            return checkpoint(self.model, x, t, use_reentrant=False)
        return self.model(x, t)


def sample_loop(x: torch.Tensor, grid: list[float], step: Step, on_state: OnState | None = None) -> torch.Tensor:
    """Apply ``step(x, t, s)`` for each consecutive pair (t, s) of ``grid``. ``on_state(t, x)``,
    when given, sees the loop's state at every grid point, the start ``grid[0]`` included (a
    defense's ``deviation_states`` collects them so)."""
    if on_state is not None:
        on_state(grid[0], x)
    for t, s in zip(grid[:-1], grid[1:]):
        x = step(x, t, s)
        if on_state is not None:
            on_state(s, x)
    return x


def ddim_transition(schedule: VPSchedule, eps_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Step:
    """The plain DDIM step (eta = 0) as a loop step: one network call."""
    return lambda x, t, s: ddim_step(schedule, x, t, s, eps_fn(x, t))


def ddim_sample(model, schedule: VPSchedule, x_t: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Deterministic DDIM from x at ``grid[0]`` through each grid point to ``grid[-1]``.

    x_t is in [-1, 1]; one network call per step, so len(grid) - 1 calls.
    """
    return sample_loop(x_t, grid, ddim_transition(schedule, NetworkCaller(model)))
