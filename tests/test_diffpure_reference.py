"""DiffPure's reverse-SDE purification replayed against a plain re-implementation of the reference.

The reference (NVlabs/DiffPure, score_sde model, as METHOD.md states it): diffuse x in [-1, 1] with
the discrete alpha_bar at index t* 1000 - 1; integrate the reverse VP-SDE with torchsde's Euler
scheme in reversed time s = 1 - t from 1 - t* to 1 - 1e-5 with ds = 1e-3 (the last step cut to
land on 1 - 1e-5); the network is called with 999 t, score = -eps / std(t) with the continuous
std; Brownian noise on every step. The loop below is written from that description alone (its own
betas, alpha_bar, drift and time stepping; in float64, whereas torchsde steps in float32) and is
driven with the noise the package drew.
"""

import math

import pytest
import torch
from torch import nn

from hetpure_bench.attacks.gradients import attack_model
from hetpure_bench.defenses import diffpure as diffpure_module
from hetpure_bench.defenses.diffpure import DiffPure, DiffPureConfig

BETA_MIN, BETA_MAX, N = 0.1, 20.0, 1000


class RecordingEps(nn.Module):
    """A tiny smooth eps-network whose output depends on the label's exact value; it records
    every label it is called with."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5, requires_grad=False)
        self.v = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64), requires_grad=False)
        self.labels: list[float] = []

    def forward(self, x, t):
        self.labels.append(float(t))
        mixed = torch.einsum("oc,bchw->bohw", self.w, x)
        return torch.tanh(mixed + math.sin(0.07 * float(t)) * self.v[:, None, None])


class SmoothClassifier(nn.Module):
    """A differentiable-everywhere classifier (no ReLU kinks to spoil finite differences)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(4, 3 * 4 * 4, generator=g, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return torch.tanh(x.flatten(1) @ self.w.T) * 3


def reference_alpha_bar_discrete(index: int) -> float:
    betas = [BETA_MIN / N + k * (BETA_MAX - BETA_MIN) / N / (N - 1) for k in range(N)]
    return math.prod(1.0 - b for b in betas[: index + 1])


def reference_diffpure(x01, eps_net, noises, t_star):
    """Plain loop: returns ((x_final + 1) / 2) unclamped, consuming ``noises`` in order."""
    noises = iter(noises)
    abar = reference_alpha_bar_discrete(round(t_star * 1000) - 1)
    x = math.sqrt(abar) * (2 * x01 - 1) + math.sqrt(1 - abar) * next(noises)
    s, s_end, ds = 1 - t_star, 1 - 1e-5, 1e-3
    while s < s_end - 1e-12:
        s_next = min(s + ds, s_end)
        t, h = 1 - s, s_next - s
        beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
        std = math.sqrt(1 - math.exp(-0.5 * t * t * (BETA_MAX - BETA_MIN) - t * BETA_MIN))
        score = -eps_net(x, 999 * t) / std
        drift = 0.5 * beta * x + beta * score  # minus the reverse-time drift -beta/2 x - beta score
        x = x + drift * h + math.sqrt(beta) * math.sqrt(h) * next(noises)
        s = s_next
    assert next(noises, None) is None  # every draw of the package was used
    return (x + 1) / 2


def _recording_noise(monkeypatch):
    drawn = []

    def randn_like(x, generator):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        drawn.append(noise)
        return noise

    monkeypatch.setattr(diffpure_module, "randn_like", randn_like)
    return drawn


def _images(seed=0):
    return torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("t_star, steps", [(0.1, 100), (0.075, 75)])
def test_sde_sampler_replays_the_diffpure_reference(monkeypatch, t_star, steps):
    drawn = _recording_noise(monkeypatch)
    net = RecordingEps()
    defense = DiffPure(SmoothClassifier(), net, DiffPureConfig(t_star=t_star, sampler="sde"), seed=3)
    x01 = _images()
    with torch.no_grad():
        purified = defense.purify(x01)
    package_labels, net.labels = net.labels, []

    expected = reference_diffpure(x01, net, drawn, t_star)

    assert len(drawn) == steps + 1 and defense.nfe == steps == len(package_labels)
    assert (purified - expected.clamp(0, 1)).abs().max() < 1e-10
    assert package_labels == pytest.approx(net.labels, rel=1e-12, abs=1e-12)
    assert package_labels[0] == pytest.approx(999 * t_star) and package_labels[-1] == pytest.approx(0.999)
    assert any(label != round(label) for label in package_labels)  # not integer steps


def test_unclamped_output_is_the_reference_output(monkeypatch):
    drawn = _recording_noise(monkeypatch)
    net = RecordingEps()
    defense = DiffPure(SmoothClassifier(), net, DiffPureConfig(sampler="sde", clamp=False), seed=4)
    x01 = _images(1)
    with torch.no_grad():
        purified = defense.purify(x01)
    expected = reference_diffpure(x01, net, drawn, 0.1)
    assert (purified - expected).abs().max() < 1e-10
    assert ((expected < 0) | (expected > 1)).any()  # so the clamp option is really tested


def test_the_previous_sde_path_is_reachable_by_its_options(monkeypatch):
    # Before: forward with the continuous alpha_bar(t*), labels round(1000 t), the last step to t = 0.
    drawn = _recording_noise(monkeypatch)
    net = RecordingEps()
    config = DiffPureConfig(sampler="sde", sde_forward="continuous", sde_time_label="rounded", sde_t_end=0.0)
    with torch.no_grad():
        purified = DiffPure(SmoothClassifier(), net, config, seed=5).purify(_images(2))
    labels, net.labels = net.labels, []
    noises = iter(drawn)
    abar = math.exp(-0.5 * 0.01 * (BETA_MAX - BETA_MIN) - 0.1 * BETA_MIN)
    x = math.sqrt(abar) * (2 * _images(2) - 1) + math.sqrt(1 - abar) * next(noises)
    for i in range(100, 0, -1):
        t, dt = i / 1000, 1e-3
        beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
        eps = net(x, i)
        std = math.sqrt(1 - math.exp(-0.5 * t * t * (BETA_MAX - BETA_MIN) - t * BETA_MIN))
        x = x + (0.5 * beta * x - beta * eps / std) * dt
        x = x + math.sqrt(beta * dt) * next(noises)
    assert labels == list(range(100, 0, -1))
    assert (purified - ((x + 1) / 2).clamp(0, 1)).abs().max() < 1e-10


def test_full_gradient_through_the_sde_path_matches_finite_differences():
    # The gradient an attack gets from defense(x) ("full" mode: exact backprop through all 100
    # checkpointed steps) with the noise fixed by restarting the streams before every call.
    defense = DiffPure(SmoothClassifier(), RecordingEps(), DiffPureConfig(sampler="sde"), seed=6)
    attacked = attack_model(defense, "full")
    y = torch.tensor([1, 3])

    def loss(x):
        defense.reseed(6)
        return nn.functional.cross_entropy(attacked(x), y, reduction="sum")

    x = _images(3).clamp(0.1, 0.9).requires_grad_(True)
    gradient = torch.autograd.grad(loss(x), x)[0]
    directions = torch.randn((3, *x.shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        for v in directions:
            numeric = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
            analytic = (gradient * v).sum()
            assert abs(numeric - analytic) / abs(analytic) < 1e-6
