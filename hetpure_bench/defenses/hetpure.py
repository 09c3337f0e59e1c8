"""Heterogeneous-noise purification (Pei et al., CVPR 2025, "Divide and Conquer").

1. Attention mask M of the input (1 = high attention), computed once per call.
2. Heterogeneous forward: the whole image to t_l.
3. Stage 1, grid points t >= t_s: x_t <- x_t * M + q(x_t | x_input) * (1 - M) with fresh noise,
   so the low-attention region follows the input (it leaves stage 1 at noise level ~t_s);
   then single-step resampling: one draw from q(x_{t+U} | x_t), and ONE DDIM step from t + U
   to the next grid point (no extra network call).
4. Stage 2, grid points t < t_s: plain DDIM on the whole image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..attention_mask import MaskConfig, attention_mask
from ..diffusion.sampling import NetworkCaller, sample_loop
from ..diffusion.schedule import ddim_step, q_forward, q_sample, timestep_grid
from ..errors import UserError
from .base import Defense


@dataclass(frozen=True)
class HetPureConfig:
    """Reference CIFAR-10 defaults: t_l 200, t_s 100, stride 2 (100 calls), U 3, tau 0.9, p 2.

    ``mask.hooks`` empty means: use the classifier's own hook specification.
    """

    t_l: int = 200
    t_s: int = 100
    stride: int = 2
    resample_steps: int = 3
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(hooks=()))

    def __post_init__(self):
        if not 0 < self.t_s <= self.t_l < 1000:
            raise UserError(f"hetpure needs 0 < t_s <= t_l < 1000, got t_s={self.t_s}, t_l={self.t_l}")
        if self.resample_steps < 0 or self.t_l + self.resample_steps > 999:
            raise UserError(f"hetpure resample_steps must be in 0..{999 - self.t_l}")
        if self.stride < 1:
            raise UserError("hetpure stride must be >= 1")


class HeterogeneousPurifier(Defense):
    name = "hetpure"
    config_class = HetPureConfig

    @property
    def nfe(self) -> int:
        """ceil(t_l / stride): one network call per grid step in both stages."""
        return math.ceil(self.config.t_l / self.config.stride)

    def surrogate(self, network_calls: int) -> Defense:
        """The same defense on a coarser grid (the reference attacks stride 100: 2 calls)."""
        return self.replace(stride=math.ceil(self.config.t_l / network_calls))

    def __init__(self, classifier, diffusion, config: HetPureConfig | None = None, seed: int = 0):
        config = config if config is not None else HetPureConfig()
        hooks = getattr(classifier, "mask_hooks", ())
        if not config.mask.hooks and hooks:  # empty means: the classifier's own hook specification
            config = dataclasses.replace(config, mask=dataclasses.replace(config.mask, hooks=tuple(hooks)))
        super().__init__(classifier, diffusion, config, seed)

    def purify(self, x01: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(self.classifier, x01, self.config.mask)
        return self.purify_with_mask(x01, mask)

    def purify_with_mask(self, x01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Purify [0,1] images given a mask (B, 1, H, W) or broadcastable; returns [0,1] images."""
        c, schedule, g = self.config, self.schedule, self.generator(x01.device)
        x0 = x01 * 2 - 1
        eps_fn = NetworkCaller(self.diffusion)

        def step(x, t, s):
            if t < c.t_s:  # stage 2
                return ddim_step(schedule, x, t, s, eps_fn(x, t))
            x = x * mask + q_sample(schedule, x0, t, g) * (1 - mask)
            if c.resample_steps:
                x, t = q_forward(schedule, x, t, t + c.resample_steps, g), t + c.resample_steps
            return ddim_step(schedule, x, t, s, eps_fn(x, t))

        x = sample_loop(q_sample(schedule, x0, c.t_l, g), timestep_grid(c.t_l, c.stride), step)
        return ((x + 1) / 2).clamp(0, 1)
