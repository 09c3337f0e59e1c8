"""The discrete variance-preserving (DDPM) noise schedule and its closed-form transitions.

Conventions (see METHOD.md):
- images x are in [-1, 1]; the network predicts eps from (x_t, t) with integer t in 0..T-1;
- ``alpha_bar(t)`` is the cumulative product of (1 - beta_i) for i <= t, so with the linear
  schedule alpha_bar(100) = 0.895 and alpha_bar(200) = 0.656;
- the clean image is time ``CLEAN = -1`` with alpha_bar = 1 (a sampler's last step lands there, or at
  t = 0 where a reference method ends there: see ``timestep_grid``).

Everything here is a pure, differentiable tensor function. Randomness is always drawn from an
explicit generator (one, or one per row: see noise.py) so that attacks which reseed the global
RNG cannot change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .noise import Generators, randn_like

CLEAN = -1
"""The time index of the clean image (alpha_bar = 1)."""

@dataclass(frozen=True)
class VPSchedule:
    """Linear-beta VP schedule: betas evenly spaced from ``beta_start`` to ``beta_end``.

    The defaults are DDPM's (Ho et al.), the N = 1000 discretisation of the VP-SDE with
    beta_min = 0.1 and beta_max = 20.
    """

    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @cached_property
    def betas(self) -> torch.Tensor:
        """beta_t for t = 0..T-1 (float64)."""
        return torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)

    @cached_property
    def _alpha_bar_padded(self) -> torch.Tensor:
        # Index 0 is the clean image (t = -1), so index t + 1 holds alpha_bar(t).
        abar = torch.cumprod(1.0 - self.betas, dim=0)
        return torch.cat([torch.ones(1, dtype=torch.float64), abar])

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha_bar(t) for t in -1..T-1 (float64; same shape as ``t``)."""
        index = torch.as_tensor(t, dtype=torch.long) + 1
        if bool(((index < 0) | (index > self.num_steps)).any()):
            raise ValueError(f"timestep out of range -1..{self.num_steps - 1}: {t}")
        return self._alpha_bar_padded[index]

    def beta(self, t: int | torch.Tensor) -> torch.Tensor:
        """beta_t for t in 0..T-1 (float64)."""
        return self.betas[torch.as_tensor(t, dtype=torch.long)]


def _coef(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cast per-sample (or scalar) schedule values to ``like``'s dtype/device, broadcastable."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


def q_sample(
    schedule: VPSchedule,
    x0: torch.Tensor,
    t: int | torch.Tensor,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). ``t`` is scalar or per-sample."""
    if noise is None:
        noise = randn_like(x0, generator)
    return diffuse(x0, schedule.alpha_bar(t), noise)


def q_sample_with_noise(
    schedule: VPSchedule, x0: torch.Tensor, t: int | torch.Tensor, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_sample``'s draw (the same one) and the standard normal noise it used."""
    noise = randn_like(x0, generator)
    return q_sample(schedule, x0, t, noise=noise), noise


def diffuse(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """sqrt(abar) x0 + sqrt(1 - abar) noise for a float64 ``alpha_bar`` (scalar or per-sample):
    ``q_sample``'s closed form, in its arithmetic (also for targets that must match its draws)."""
    abar = _coef(alpha_bar, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def q_forward(
    schedule: VPSchedule,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    s: int | torch.Tensor,
    generator: Generators = None,
) -> torch.Tensor:
    """Draw x_s ~ q(x_s | x_t) for s >= t: the composition of the one-step transitions t -> s.

    With s = t + U this is the "U forward transitions" of single-step resampling, in one draw.
    """
    ratio = _coef(schedule.alpha_bar(s) / schedule.alpha_bar(t), x_t)
    if bool((ratio > 1).any()):
        raise ValueError("q_forward needs s >= t (it only adds noise)")
    return ratio.sqrt() * x_t + (1.0 - ratio).sqrt() * randn_like(x_t, generator)


def predict_x0(
    schedule: VPSchedule, x_t: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); not clipped, as in the reference code."""
    abar = _coef(schedule.alpha_bar(t), x_t)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def ddim_step(
    schedule: VPSchedule,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    s: int | torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Deterministic DDIM step (eta = 0) from t to any s < t (s = CLEAN returns x0_hat)."""
    x0_hat = predict_x0(schedule, x_t, t, eps)
    abar_s = _coef(schedule.alpha_bar(s), x_t)
    return abar_s.sqrt() * x0_hat + (1.0 - abar_s).sqrt() * eps


VARIANCES = ("small", "large", "clipped", "fixedlarge")
"""The ancestral-step variance choices of ``ddpm_mean_variance``."""


def _posterior_variance(schedule: VPSchedule, t: torch.Tensor) -> torch.Tensor:
    """beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t): zero at t = 0."""
    return schedule.beta(t) * (1.0 - schedule.alpha_bar(t - 1)) / (1.0 - schedule.alpha_bar(t))


def ddpm_mean_variance(
    schedule: VPSchedule,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    eps: torch.Tensor,
    variance: str = "small",
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (broadcastable to x_t) of the ancestral step p(x_{t-1} | x_t).

    mean = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(1 - beta_t), which is the posterior
    mean of q(x_{t-1} | x_t, x0_hat); with ``clip_x0`` it is the posterior mean of x0_hat clamped
    to [-1,1] instead (DDPM's sampler code): (beta_t sqrt(abar_{t-1}) x0 + (1 - abar_{t-1})
    sqrt(1 - beta_t) x_t) / (1 - abar_t), the clamped x0_hat itself at t = 0.
    ``variance`` is "small" (posterior beta_tilde_t, zero at t = 0), "large" (beta_t, DDPM's other
    choice), "clipped" ("small" with the t = 0 value replaced by the t = 1 value: DDPM's clipped
    log-variance) or "fixedlarge" ("large" with the t = 0 value replaced by beta_tilde_1: the
    log-variance of DDPM's CIFAR-10 sampler, which GDMP uses for its noise and guidance weight).
    """
    t_tensor = torch.as_tensor(t, dtype=torch.long)
    beta = schedule.beta(t_tensor)
    abar_t = schedule.alpha_bar(t_tensor)
    if variance == "small":
        var = _posterior_variance(schedule, t_tensor)
    elif variance == "clipped":
        var = _posterior_variance(schedule, t_tensor.clamp_min(1))
    elif variance == "large":
        var = beta
    elif variance == "fixedlarge":
        var = torch.where(t_tensor == 0, _posterior_variance(schedule, torch.ones_like(t_tensor)), beta)
    else:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    if clip_x0:
        mean = posterior_mean(schedule, predict_x0(schedule, x_t, t_tensor, eps).clamp(-1.0, 1.0), x_t, t_tensor, t_tensor - 1)
    else:
        mean = (x_t - _coef(beta / (1.0 - abar_t).sqrt(), x_t) * eps) / _coef((1.0 - beta).sqrt(), x_t)
    return mean, _coef(var, x_t)


def ddpm_step(
    schedule: VPSchedule,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    eps: torch.Tensor,
    generator: Generators = None,
    variance: str = "small",
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (see ``ddpm_mean_variance``); the last
    step (t = 0) adds no noise whatever the variance choice."""
    mean, var = ddpm_mean_variance(schedule, x_t, t, eps, variance)
    not_last = _coef((torch.as_tensor(t, dtype=torch.long) > 0).double(), x_t)
    return mean + not_last * var.sqrt() * randn_like(x_t, generator)


def ddpm_posterior_step(
    schedule: VPSchedule,
    x_t: torch.Tensor,
    t: int,
    s: int,
    eps: torch.Tensor,
    generator: Generators = None,
) -> torch.Tensor:
    """Ancestral step from t to any s < t: a draw from q(x_s | x_t, x0_hat), x0_hat clipped to [-1, 1].

    This is RePaint's (guided-diffusion's) step with ``clip_denoised``: on a strided grid, the DDPM
    step of the respaced schedule (beta = 1 - abar_t / abar_s); with s = t - 1 it is DDPM's step with
    the posterior variance. The variance is zero at s = CLEAN, where the step returns x0_hat.
    """
    x0_hat = predict_x0(schedule, x_t, t, eps).clamp(-1, 1)
    abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    var = (1.0 - abar_t / abar_s) * (1.0 - abar_s) / (1.0 - abar_t)
    return posterior_mean(schedule, x0_hat, x_t, t, s) + _coef(var.sqrt(), x_t) * randn_like(x_t, generator)


def posterior_mean(
    schedule: VPSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, s: int | torch.Tensor
) -> torch.Tensor:
    """Mean of q(x_s | x_t, x0) for s < t: (sqrt(abar_s) beta_ts x0 + sqrt(abar_t / abar_s)
    (1 - abar_s) x_t) / (1 - abar_t) with beta_ts = 1 - abar_t / abar_s (beta_t when s = t - 1)."""
    abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    beta = 1.0 - abar_t / abar_s
    coef_x0 = abar_s.sqrt() * beta / (1.0 - abar_t)
    coef_xt = (abar_t / abar_s).sqrt() * (1.0 - abar_s) / (1.0 - abar_t)
    return _coef(coef_x0, x_t) * x0 + _coef(coef_xt, x_t) * x_t


def timestep_grid(t_start: int, stride: int, end: int = CLEAN) -> list[int]:
    """The network-call times of a strided sampler from ``t_start`` down to ``end``.

    Returns [t_start, t_start - stride, ...] down to the smallest positive entry, followed by
    ``end``: ``CLEAN`` (the last step lands on the clean image, its x0 prediction) or 0 (it
    lands at t = 0, alpha_bar = 0.9999, as the heterogeneous-noise reference does). The sampler
    calls the network at every entry but the last, so the number of network calls is
    ceil(t_start / stride) either way. E.g. (100, 10) -> [100, 90, ..., 10, -1] (10 calls);
    (200, 100, end=0) -> [200, 100, 0] (2 calls).
    """
    if t_start < 1 or stride < 1:
        raise ValueError(f"need t_start >= 1 and stride >= 1, got {t_start}, {stride}")
    if end not in (CLEAN, 0):
        raise ValueError(f"a grid ends at CLEAN (-1) or 0, got {end}")
    return list(range(t_start, 0, -stride)) + [end]
