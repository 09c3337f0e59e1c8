"""GDMP (Wang et al., 2022): guided DDPM purification, by default as the official code runs it.

One iteration: diffuse the current image to alpha_bar(t_guide), then t_guide ancestral steps
(calls at t_guide - 1 .. 0). At each step the posterior mean (of the clamped x0_hat) gets the
guidance var_t * s_t * grad_{x_t} sim(x_t, q(x_input)_t) with a fresh noisy copy of the input,
where var_t is the "fixedlarge" variance (also the step's noise variance),
s_t = scale * (3 * 255 / (2 * ptb)) * sqrt(1 - abar_t) / sqrt(abar_t), and sim is minus the
mean squared error (scale 60000) or SSIM (scale 70000), divided by the reference's batch size of
100. ``iterations`` iterations per path; ``paths`` independent paths whose logits are averaged.
Each difference from the reference is a named option of ``GDMPConfig``.

Full gradients include the guidance term's dependence on the input (second-order backprop:
the guidance gradient is taken with create_graph while an attack records a graph).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..diffusion.noise import randn_like
from ..diffusion.sampling import NetworkCaller, sample_loop
from ..diffusion.schedule import CLEAN, VARIANCES, VPSchedule, ddpm_mean_variance, q_sample
from ..errors import UserError
from .base import Defense
from .ssim import PADDINGS, ssim

SIMILARITIES = {"mse": 60000.0, "ssim": 70000.0}
NOISE_LEVELS = ("t_guide", "first_call")
SSIM_IMAGES = ("signed", "unit")
REDUCIBLE = ("t_guide", "iterations", "paths")  # the settings a cheaper run lowers


def guidance_scale(schedule: VPSchedule, t: int, scale: float, ptb: float) -> float:
    """s_t = scale * (3 * 255 / (2 * ptb)) * sqrt(1 - abar_t) / sqrt(abar_t)."""
    abar = schedule.alpha_bar(t).item()
    return scale * (3 * 255 / (2 * ptb)) * math.sqrt(1 - abar) / math.sqrt(abar)


def similarity(
    kind: str, x: torch.Tensor, target: torch.Tensor, ssim_window: str = "same", ssim_images: str = "signed"
) -> torch.Tensor:
    """Per-image similarity of [-1,1] images: minus the mean squared error, or SSIM.

    SSIM with ``ssim_images`` "signed" is computed on the [-1,1] images themselves with the
    constants of a unit data range (C1 = 0.01^2, C2 = 0.03^2), as the reference does; "unit"
    maps them to [0,1] first.
    """
    if kind == "ssim":
        if ssim_images == "unit":
            x, target = (x + 1) / 2, (target + 1) / 2
        return ssim(x, target, padding=ssim_window)
    return -(x - target).pow(2).flatten(1).mean(1)


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"GDMP {name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class GDMPConfig:
    """GDMP's settings. The defaults are the official code's guided CIFAR-10 run (its AutoAttack
    config: MSE guidance at scale 60000, 36 steps, 4 iterations, 10 paths, batch size 100).

    t_guide, iterations, paths: steps per iteration, iterations per path, paths per prediction.
    similarity: "mse" (default: the only reference config with guidance switched on) or "ssim"
      (the reference's default config names SSIM at 70000 but runs unguided).
    scale: None for the similarity's reference scale (60000 MSE, 70000 SSIM).
    ptb: the attack budget in /255 units, as in GDMP's scale formula.
    guidance_batch: each image's similarity is divided by this. 100 (default): the reference
      averages the similarity over its batch of 100, so each image gets 1/100 of its own
      similarity's gradient, here independently of our batch size; 1: the per-image sum
      (this project's behaviour before M9, about 100x stronger).
    variance: the step variance, also the guidance weight (a ``ddpm_mean_variance`` choice):
      "fixedlarge" (default, the reference's) or e.g. "clipped" (before M9: beta_tilde_t, and
      beta_tilde_1 at t = 0).
    clip_x0: True (default, the reference): the mean is the posterior mean of x0_hat clamped to
      [-1,1]; False (before M9): of the unclamped x0_hat.
    noise_level: "t_guide" (default, the reference): each iteration noises to alpha_bar(t_guide)
      and the first network call is at t_guide - 1, one level below; "first_call" (before M9):
      noises to alpha_bar(t_guide - 1), the first call's own level.
    ssim_window: "same" (default, the reference: zero-padded, all positions) or "valid" (before
      M9: Wang et al.'s unpadded definition).
    ssim_images: "signed" (default, the reference: SSIM of the [-1,1] images) or "unit" (before
      M9: of the images mapped to [0,1]).
    """

    t_guide: int = 36
    iterations: int = 4
    paths: int = 10
    similarity: str = "mse"
    scale: float | None = None
    ptb: float = 8.0
    guidance_batch: int = 100
    variance: str = "fixedlarge"
    clip_x0: bool = True
    noise_level: str = "t_guide"
    ssim_window: str = "same"
    ssim_images: str = "signed"

    def __post_init__(self):
        _choice("similarity", self.similarity, tuple(SIMILARITIES))
        _choice("variance", self.variance, VARIANCES)
        _choice("noise_level", self.noise_level, NOISE_LEVELS)
        _choice("ssim_window", self.ssim_window, PADDINGS)
        _choice("ssim_images", self.ssim_images, SSIM_IMAGES)
        if not 1 <= self.t_guide <= 999 or self.iterations < 1 or self.paths < 1 or self.ptb <= 0:
            raise UserError("GDMP needs 1 <= t_guide <= 999, iterations >= 1, paths >= 1 and ptb > 0")
        if not isinstance(self.guidance_batch, int) or self.guidance_batch < 1:
            raise UserError(f"GDMP guidance_batch must be an integer >= 1, got {self.guidance_batch!r}")
        if not isinstance(self.clip_x0, bool):
            raise UserError(f"GDMP clip_x0 must be true or false, got {self.clip_x0!r}")

    @property
    def guide_scale(self) -> float:
        return self.scale if self.scale is not None else SIMILARITIES[self.similarity]

    @property
    def noise_step(self) -> int:
        """The schedule index each iteration diffuses to."""
        return self.t_guide if self.noise_level == "t_guide" else self.t_guide - 1


REFERENCE = GDMPConfig()


def deviations(config: GDMPConfig) -> list[str]:
    """Label items for settings that differ from the reference's: ``reduced(...)`` for fewer
    steps, iterations or paths, ``modified(...)`` for anything else (``value/reference``)."""
    reduced, modified = [], []
    for field in dataclasses.fields(GDMPConfig):
        if field.name == "scale":
            ours, ref = config.guide_scale, REFERENCE.guide_scale
        else:
            ours, ref = getattr(config, field.name), getattr(REFERENCE, field.name)
        if ours != ref:
            lower = field.name in REDUCIBLE and ours < ref
            (reduced if lower else modified).append(f"{field.name}={ours}/{ref}")
    return [f"{label}({','.join(items)})" for label, items in (("reduced", reduced), ("modified", modified)) if items]


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

    def describe(self) -> str:
        """The reference deviations first (a reduced run says so), then every setting."""
        return " ".join(deviations(self.config) + [super().describe()])

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
            x = q_sample(schedule, x, c.noise_step, g)
            x = sample_loop(x, grid, lambda x, t, s: self._guided_step(x, t, target, eps_fn, g))
        return ((x + 1) / 2).clamp(0, 1)

    def _guided_step(self, x, t, target, eps_fn, g):
        c, schedule = self.config, self.schedule
        noisy_target = q_sample(schedule, target, t, g)
        mean, var = ddpm_mean_variance(schedule, x, t, eps_fn(x, t), variance=c.variance, clip_x0=c.clip_x0)
        recording = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            x_in = x if recording else x.detach().requires_grad_(True)
            sims = similarity(c.similarity, x_in, noisy_target, c.ssim_window, c.ssim_images)
            # Each image's own similarity / guidance_batch: the reference's batch mean, batch-independently.
            grad, = torch.autograd.grad(sims.sum() / c.guidance_batch, x_in, create_graph=recording)
        mean = mean + var * guidance_scale(schedule, t, c.guide_scale, c.ptb) * grad
        return mean + var.sqrt() * randn_like(x, g) if t > 0 else mean
