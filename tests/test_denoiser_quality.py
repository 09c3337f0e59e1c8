import math

import pytest
import torch
from torch import nn

from hetpure_bench.diffusion.denoiser_quality import ddim_purify, evaluate_denoiser, one_step_psnr, psnr
from hetpure_bench.diffusion.schedule import VPSchedule

S = VPSchedule()


class OracleEps(nn.Module):
    """Knows the clean images, so it returns the exact noise of any x_t: a perfect denoiser."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x_t, t):
        a = S.alpha_bar(t).item()
        return (x_t - math.sqrt(a) * self.x0) / math.sqrt(1 - a)


class ZeroEps(nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def test_psnr_hand_computed():
    a = torch.zeros(1, 3, 2, 2)
    b = torch.full((1, 3, 2, 2), 0.1)
    assert psnr(a, b).item() == pytest.approx(20.0)  # mse 0.01 -> 20 dB
    assert psnr(torch.full((1, 1), 2.0), torch.ones(1, 1)).item() > 100  # clipped to [0,1] first


def test_oracle_purifies_exactly():
    x01 = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    out = ddim_purify(OracleEps(x01 * 2 - 1), S, x01, 100, 10, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x01)


def test_zero_eps_prediction_equals_the_rescaled_noisy_input():
    x01 = torch.rand(4, 3, 8, 8)
    noisy, pred = one_step_psnr(ZeroEps(), S, x01, 100, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, pred)
    # Noise of std sqrt((1-abar)/abar)/2 on the [0,1] scale is about 15.3 dB before clipping.
    assert 14 < noisy.mean().item() < 20


class Oracle01Classifier(nn.Module):
    """Predicts a label from the mean brightness, so purification quality changes accuracy."""

    def forward(self, x01):
        return torch.stack([-(x01.mean((1, 2, 3)) - 0.25).abs(), -(x01.mean((1, 2, 3)) - 0.75).abs()], 1)


def test_evaluate_denoiser_with_oracle():
    x01 = torch.cat([torch.full((3, 3, 8, 8), 0.25), torch.full((3, 3, 8, 8), 0.75)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    result = evaluate_denoiser(OracleEps(x01 * 2 - 1), Oracle01Classifier(), x01, labels, [100], 100, 50, seed=0, batch_size=6)
    assert result["accuracy_alone"] == result["accuracy_purified"] == 1.0
    assert result["network_calls"] == 2
    assert result["one_step_psnr_db"][100]["x0_prediction"] > 60
    assert result["one_step_psnr_db"][100]["noisy_input"] < 25
