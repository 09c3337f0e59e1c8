"""Heterogeneous-noise purification (Pei et al., CVPR 2025, "Divide and Conquer").

1. Attention mask M of the input (1 = high attention), computed once per distinct input image.
2. Heterogeneous forward: the whole image to t_l.
3. Stage 1, a step from grid point t to the next grid point s >= t_s (the reference's rule):
   x_t <- x_t * M + q(x_t | x_input) * (1 - M) with fresh noise, so the low-attention region
   follows the input (it leaves stage 1 at noise level ~t_s); then single-step resampling: one
   draw from q(x_{t+U} | x_t), and ONE DDIM step from t + U to s (no extra network call).
4. Stage 2, the steps to s < t_s: plain DDIM on the whole image, down to t = 0 (alpha_bar_0 =
   0.9999; the reference's last step lands there, not on the x0 prediction).

The same machinery, configured differently, gives the paper's ablations (no resampling,
RePaint's multi-step resampling, uniform noise, random masks) and the RePaint-style purifier.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..diffusion.noise import rand_like
from ..diffusion.resampling import denoising_steps, jump_schedule
from ..diffusion.sampling import NetworkCaller, OnState, sample_loop
from ..diffusion.schedule import (
    CLEAN,
    ddim_step,
    ddpm_posterior_step,
    q_forward,
    q_sample,
    q_sample_with_noise,
    timestep_grid,
)
from ..errors import UserError
from .attention_mask import MaskConfig, attention_mask
from .base import Defense, DeviationStates, StateLog

RESAMPLING = ("single", "multi", "none")
MASK_MODES = ("attention", "ones", "zeros", "random")
STAGE_RULES = ("next", "current")
FINAL_STEPS = ("t0", "clean")
SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class HetPureConfig:
    """Reference CIFAR-10 defaults: t_l 200, t_s 100, stride 2 (100 calls), U 3, tau 0.9, p 2.

    The grid is t_l, t_l - stride, ... > 0, then ``final_step``: "t0" (the reference: the last
    DDIM step lands at t = 0, x = sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps_hat) or "clean" (it
    lands on x0_hat, this project's earlier behaviour); ceil(t_l / stride) calls either way.
    stage_rule: which steps t -> s are stage-1 steps (blend with the re-noised input, then
    resample): "next" (s >= t_s, the reference's rule: at stride 100 only t = 200 blends) or
    "current" (t >= t_s, this project's earlier rule). resampling: "single" (one draw
    q(x_{t+U} | x_t), then one step from t + U), "multi" (RePaint: jump back ``jump_length``
    grid steps and re-denoise, U times per jump position; jumps start at grid points >= t_s, so
    every step a jump re-does is a stage-1 step under either rule) or "none". sampler: "ddim"
    (eta = 0, x0_hat not clipped, as the reference) or "ddpm" (RePaint's ancestral step with
    x0_hat clipped: ``ddpm_posterior_step``). mask_mode: "attention" (the classifier-attention
    mask), "ones" (uniform strong noise), "zeros" (uniform weak noise) or "random" (a random
    mask with as many ones as the attention mask). ``mask.hooks`` empty means the classifier's
    own hooks.
    """

    t_l: int = 200
    t_s: int = 100
    stride: int = 2
    resampling: str = "single"
    resample_steps: int = 3
    jump_length: int = 1
    stage_rule: str = "next"
    final_step: str = "t0"
    sampler: str = "ddim"
    mask_mode: str = "attention"
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(hooks=()))

    def __post_init__(self):
        if not 0 < self.t_s <= self.t_l < 1000:
            raise UserError(f"hetpure needs 0 < t_s <= t_l < 1000, got t_s={self.t_s}, t_l={self.t_l}")
        if self.resampling not in RESAMPLING:
            raise UserError(f"hetpure resampling must be one of {', '.join(RESAMPLING)}, got {self.resampling!r}")
        choices = {"mask_mode": MASK_MODES, "stage_rule": STAGE_RULES, "final_step": FINAL_STEPS, "sampler": SAMPLERS}
        for setting, allowed in choices.items():
            if getattr(self, setting) not in allowed:
                raise UserError(f"hetpure {setting} must be one of {', '.join(allowed)}, got {getattr(self, setting)!r}")
        if self.resample_steps < 0 or self.t_l + self.resample_steps > 999:
            raise UserError(f"hetpure resample_steps must be in 0..{999 - self.t_l}")
        if self.stride < 1 or self.jump_length < 1:
            raise UserError("hetpure stride and jump_length must be >= 1")


def distinct_prefix(x: torch.Tensor) -> int:
    """The smallest n such that the batch ``x`` is its first n rows repeated (x.repeat(k, ...))."""
    rows = x.shape[0]
    for n in range(1, rows):
        if rows % n == 0 and torch.equal(x[n:], x[:-n]):  # period n: row i equals row i + n
            return n
    return rows


class HeterogeneousPurifier(Defense):
    name = "hetpure"
    config_class = HetPureConfig

    def __init__(self, classifier, diffusion, config: HetPureConfig | None = None, seed: int = 0):
        config = config if config is not None else self.config_class()
        hooks = getattr(classifier, "mask_hooks", ())
        if not config.mask.hooks and hooks:  # empty means: the classifier's own hook specification
            config = dataclasses.replace(config, mask=dataclasses.replace(config.mask, hooks=tuple(hooks)))
        super().__init__(classifier, diffusion, config, seed)
        self.mask_temperature: float | None = None  # set only for the mask-aware attack
        self._last_attention: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its mask)

    @property
    def has_attention_mask(self) -> bool:
        return self.config.mask_mode == "attention"

    def attention_mask(self, x01: torch.Tensor) -> torch.Tensor:
        """The detached attention mask (B, 1, H, W) of [0,1] images, the very one ``purify`` uses
        (mask_mode attention only; the other modes' masks are not the classifier's attention)."""
        if not self.has_attention_mask:
            raise UserError(f"defense {self.name!r} uses mask_mode={self.config.mask_mode!r}: no attention mask")
        with torch.no_grad():
            return self._attention(x01)

    def with_mask_gradient(self, temperature: float) -> "HeterogeneousPurifier":
        """The same defense with a straight-through differentiable mask (the mask-aware
        adaptive attack differentiates this; the evaluated defense keeps the detached mask)."""
        if not self.has_attention_mask:
            raise UserError(f"defense {self.name!r} uses mask_mode={self.config.mask_mode!r}: no attention mask to attack")
        if not temperature > 0:
            raise UserError(f"the mask temperature must be > 0, got {temperature}")
        relaxed = self.replace()
        relaxed.mask_temperature = float(temperature)
        return relaxed

    def replace(self, **changes) -> "HeterogeneousPurifier":
        copy = super().replace(**changes)
        copy.mask_temperature = self.mask_temperature
        return copy

    def _grid(self) -> list[int]:
        return timestep_grid(self.config.t_l, self.config.stride, end=0 if self.config.final_step == "t0" else CLEAN)

    def _in_stage_1(self, t: int, s: int) -> bool:
        """Whether the denoising step t -> s blends with the re-noised input and resamples."""
        return (s if self.config.stage_rule == "next" else t) >= self.config.t_s

    def _schedule(self) -> tuple[list[int], int]:
        """The grid positions visited and the number of network calls (closed form)."""
        c, grid = self.config, self._grid()
        n = len(grid) - 1
        jumps = c.resample_steps if c.resampling == "multi" else 0
        # Jumps start at the grid points >= t_s: the points a stage-1 step reaches under the
        # "next" rule, and leaves under "current"; either way the re-done steps are stage-1 steps.
        at_stage_1_point = lambda position: grid[position] >= c.t_s  # noqa: E731 - a predicate as data
        return (
            jump_schedule(n, c.jump_length, jumps, at_stage_1_point),
            denoising_steps(n, c.jump_length, jumps, at_stage_1_point),
        )

    @property
    def nfe(self) -> int:
        """One call per denoising step: ceil(t_l / stride) whatever the final step and stage rule,
        plus U * jump_length per jump position with multi-step resampling (single-step resampling
        adds no call)."""
        return self._schedule()[1]

    def surrogate(self, network_calls: int) -> Defense:
        """The same defense on a coarser grid (the reference attacks stride 100: 2 calls)."""
        return self.replace(stride=math.ceil(self.config.t_l / network_calls))

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        return self.purify_with_mask(x01, self.mask(x01))

    def deviation_states(self, x01: torch.Tensor) -> DeviationStates:
        """The loop's states at every grid point it visits ("the same steps" on hetpure's grid):
        t_l first (the input diffused to t_l), then each point a step lands on, before the next
        step blends it with the re-noised input; a point visited again after a multi-step
        resampling jump once per visit (the re-noised state after the jump too); the last point
        (t = 0 or the clean image) last. The intermediate state of single-step resampling
        (at t + U) is inside a step, not a loop state. The targets x_t use the noise of the
        noising to t_l at every t (stage 1's re-noised input draws fresh noise; they do not)."""
        log = StateLog()
        purified, noise = self._purify_with_mask(x01, self.mask(x01), log)
        return log.deviation_states(purified, x01, noise, self.schedule.alpha_bar)

    def stages(self, x01: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Purified, the mask, and the heterogeneously noised input: q(x, t_l) where the mask is 1,
        q(x, t_s) elsewhere (shown in [0,1])."""
        mask = self.mask(x01)
        purified = self.purify_with_mask(x01, mask)
        c, g, x0 = self.config, self.generator(x01), x01 * 2 - 1
        noised = q_sample(self.schedule, x0, c.t_l, g) * mask + q_sample(self.schedule, x0, c.t_s, g) * (1 - mask)
        return [("purified", purified), ("mask", mask), (f"noised t_l={c.t_l}/t_s={c.t_s}", ((noised + 1) / 2).clamp(0, 1))]

    def mask(self, x01: torch.Tensor) -> torch.Tensor:
        """The (B, 1, H, W) mask of the configured mask mode; 1 = strong noise."""
        mode = self.config.mask_mode
        shape = (x01.shape[0], 1, *x01.shape[-2:])
        if mode == "ones":
            return x01.new_ones(shape)
        if mode == "zeros":
            return x01.new_zeros(shape)
        attention = self._attention(x01)
        return attention if mode == "attention" else self._random_like(attention)

    def _attention(self, x01: torch.Tensor) -> torch.Tensor:
        """The attention mask, one classifier pass per distinct image: an EOT batch repeats its
        images, and evaluation's passes (worst-of-N, vote-of-m) purify the same input again."""
        if self.mask_temperature is not None and torch.is_grad_enabled():  # the attacker moves it
            return attention_mask(self.classifier, x01, self.config.mask, self.mask_temperature)
        last = self._last_attention
        if last is not None and last[0].shape == x01.shape and last[0].device == x01.device and torch.equal(last[0], x01):
            return last[1]
        n = distinct_prefix(x01)
        attention = attention_mask(self.classifier, x01[:n], self.config.mask).repeat(x01.shape[0] // n, 1, 1, 1)
        self._last_attention = (x01.detach().clone(), attention)
        return attention

    def _random_like(self, mask: torch.Tensor) -> torch.Tensor:
        """Per image, the same number of ones as ``mask`` at uniformly random pixels."""
        flat = mask.flatten(1)
        scores = rand_like(flat, self.generator(flat))
        ranks = scores.argsort(1).argsort(1)
        return (ranks < flat.sum(1, keepdim=True)).to(mask.dtype).view_as(mask)

    def purify_with_mask(self, x01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Purify [0,1] images given a mask (B, 1, H, W) or broadcastable; returns [0,1] images."""
        return self._purify_with_mask(x01, mask)[0]

    def _purify_with_mask(
        self, x01: torch.Tensor, mask: torch.Tensor, on_state: OnState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The purified [0,1] images and the noise of the noising to t_l; ``on_state`` sees the
        loop's states."""
        c, schedule, g = self.config, self.schedule, self.generator(x01)
        x0 = x01 * 2 - 1
        eps_fn = NetworkCaller(self.diffusion)
        single_u = c.resample_steps if c.resampling == "single" else 0

        def denoise(x, t, s):  # one network call
            if c.sampler == "ddpm":
                return ddpm_posterior_step(schedule, x, t, s, eps_fn(x, t), g)
            return ddim_step(schedule, x, t, s, eps_fn(x, t))

        def step(x, t, s):
            if s > t:  # a multi-step resampling jump back up: re-noise, no network call
                return q_forward(schedule, x, t, s, g)
            if not self._in_stage_1(t, s):  # stage 2
                return denoise(x, t, s)
            x = x * mask + q_sample(schedule, x0, t, g) * (1 - mask)
            if single_u:
                x, t = q_forward(schedule, x, t, t + single_u, g), t + single_u
            return denoise(x, t, s)

        grid = self._grid()
        visited = [grid[position] for position in self._schedule()[0]]
        start, noise = q_sample_with_noise(schedule, x0, c.t_l, g)
        x = sample_loop(start, visited, step, on_state)
        return ((x + 1) / 2).clamp(0, 1), noise
