"""How good is a diffusion model as a purifier's denoiser? One-step PSNR and purified accuracy."""

from __future__ import annotations

import torch
from torch import nn

from .sampling import ddim_sample
from .schedule import VPSchedule, predict_x0, q_sample, timestep_grid


def psnr(image01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0,1] images (both clipped to [0,1] first, as a viewer would)."""
    mse = (image01.clamp(0, 1) - reference01.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


@torch.no_grad()
def one_step_psnr(
    model: nn.Module, schedule: VPSchedule, x01: torch.Tensor, t: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR of the noisy input x_t / sqrt(abar_t) and of the one-step x0 prediction.

    x01 is in [0, 1]; both outputs are compared with it on the [0, 1] scale.
    """
    x0 = x01 * 2 - 1
    x_t = q_sample(schedule, x0, t, generator)
    x0_hat = predict_x0(schedule, x_t, t, model(x_t, t))
    noisy = x_t / schedule.alpha_bar(t).sqrt().item()
    return psnr((noisy + 1) / 2, x01), psnr((x0_hat + 1) / 2, x01)


@torch.no_grad()
def ddim_purify(
    model: nn.Module, schedule: VPSchedule, x01: torch.Tensor, t_start: int, stride: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Diffuse [0,1] images to t_start, run strided DDIM back to clean; returns [0,1] images."""
    x_t = q_sample(schedule, x01 * 2 - 1, t_start, generator)
    x0 = ddim_sample(model, schedule, x_t, timestep_grid(t_start, stride))
    return ((x0 + 1) / 2).clamp(0, 1)


@torch.no_grad()
def evaluate_denoiser(
    model: nn.Module,
    classifier: nn.Module,
    x01: torch.Tensor,
    labels: torch.Tensor,
    psnr_times: list[int],
    purify_t: int,
    purify_stride: int,
    seed: int,
    batch_size: int = 128,
) -> dict:
    """One-step PSNR at each of ``psnr_times`` and accuracy of ``classifier`` alone and after
    DDIM purification from ``purify_t`` with ``purify_stride``. Deterministic for a given seed
    and batch size (noise comes from one generator, batch after batch)."""
    schedule = VPSchedule()
    generator = torch.Generator().manual_seed(seed)
    batches = list(zip(x01.split(batch_size), labels.split(batch_size)))
    result: dict = {"one_step_psnr_db": {}}
    for t in psnr_times:
        pairs = [one_step_psnr(model, schedule, x, t, generator) for x, _ in batches]
        result["one_step_psnr_db"][t] = {
            "noisy_input": torch.cat([p[0] for p in pairs]).mean().item(),
            "x0_prediction": torch.cat([p[1] for p in pairs]).mean().item(),
        }
    correct_alone = correct_purified = 0
    purified_psnr = []
    for x, y in batches:
        purified = ddim_purify(model, schedule, x, purify_t, purify_stride, generator)
        correct_alone += (classifier(x).argmax(1) == y).sum().item()
        correct_purified += (classifier(purified).argmax(1) == y).sum().item()
        purified_psnr.append(psnr(purified, x))
    n = len(labels)
    result.update(
        accuracy_alone=correct_alone / n,
        accuracy_purified=correct_purified / n,
        purified_psnr_db=torch.cat(purified_psnr).mean().item(),
        network_calls=len(timestep_grid(purify_t, purify_stride)) - 1,
    )
    return result
