"""Replays of the reference algorithms against the package's hetpure and repaint defenses.

The reference loops below use nothing from the package: their own betas and alpha_bar, DDIM and
DDPM formulas, re-noising, resampling draws, grids and jump schedule, written from METHOD.md and
the authors' code. Both sides run the same tiny deterministic eps-network (float64, recording its
time labels) and the same noise: the package's draws are recorded in order and the reference
consumes them in its own order, checking each shape, so a different draw order fails too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TinyClassifier

from hetpure_bench.defenses import build_defense
from hetpure_bench.defenses import hetpure as hetpure_module
from hetpure_bench.diffusion import schedule as schedule_module
from hetpure_bench.errors import UserError

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ALPHA_BAR = torch.cumprod(1 - BETAS, 0)


def abar(t: int) -> float:
    return 1.0 if t == -1 else ALPHA_BAR[t].item()  # -1: the clean image


class RecordingEps(torch.nn.Module):
    """eps(x, t) = tanh((1 + t / 500) conv(x) + t / 1000): smooth, time-dependent, records t."""

    def __init__(self, seed: int = 0):
        super().__init__()
        weight = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.3
        self.register_buffer("weight", weight)
        self.times: list[int] = []

    def forward(self, x, t):
        self.times.append(int(t))
        return torch.tanh((1 + t / 500) * F.conv2d(x, self.weight, padding=1) + t / 1000)


class Replay:
    """The package's recorded draws, handed out in order."""

    def __init__(self, draws):
        self.draws, self.used = draws, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        draw = self.draws[self.used]
        assert draw.shape == like.shape, f"draw {self.used}: {tuple(draw.shape)} vs {tuple(like.shape)}"
        self.used += 1
        return draw


@pytest.fixture
def recorded_draws(monkeypatch):
    """Every standard normal draw the package's transitions make, in order."""
    draws = []
    original = schedule_module.randn_like

    def recording(x, generator):
        draw = original(x, generator)
        draws.append(draw.clone())
        return draw

    monkeypatch.setattr(schedule_module, "randn_like", recording)
    return draws


def _inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x01 = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, 1, 8, 8, generator=g) < 0.4).double()  # 1 = high attention
    return x01, mask


def _package(name, overrides, x01, mask, seed=0):
    net = RecordingEps()
    defense = build_defense(name, TinyClassifier().double(), net, overrides, seed=seed)
    with torch.no_grad():
        out = defense.purify_with_mask(x01, mask)
    return out, net.times, defense


# --- the heterogeneous-noise reference ----------------------------------------------------------


def reference_hetpure(x01, mask, eps_net, noise, t_l=200, t_s=100, stride=2, u=3, stage_rule="next", final="t0"):
    """The authors' loop: grid = the multiples of ``stride`` from t_l down to 0 (their
    get_ddim_steps); a step t -> s blends the low-attention region with a fresh q(x_t | x_in)
    and resamples (U forward transitions as one draw, then the DDIM step from t + U) iff
    s >= t_s; DDIM without x0 clipping; the output is x at t = 0, mapped to [0,1] and clamped.
    ``stage_rule="current"`` (t >= t_s) and ``final="clean"`` (land on x0_hat) are the earlier rules."""
    x_in = x01 * 2 - 1
    grid = list(range(0, t_l + 1, stride))[::-1]
    if final == "clean":
        grid[-1] = -1

    def renoised_input(t):
        return math.sqrt(abar(t)) * x_in + math.sqrt(1 - abar(t)) * noise(x_in)

    x = renoised_input(t_l)
    for t, s in zip(grid, grid[1:]):
        if (s if stage_rule == "next" else t) >= t_s:
            x = x * mask + renoised_input(t) * (1 - mask)
            if u:
                ratio = abar(t + u) / abar(t)
                x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise(x)
                t = t + u
        eps = eps_net(x, t)
        x0_hat = (x - math.sqrt(1 - abar(t)) * eps) / math.sqrt(abar(t))
        x = math.sqrt(abar(s)) * x0_hat + math.sqrt(1 - abar(s)) * eps
    return ((x + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize(
    "stride, u, resampling",
    [(2, 3, "single"), (2, 0, "none"), (100, 3, "single"), (100, 0, "none"), (5, 10, "single")],
)
def test_hetpure_replays_the_reference(recorded_draws, stride, u, resampling):
    x01, mask = _inputs()
    out, times, _ = _package("hetpure", {"stride": stride, "resample_steps": u, "resampling": resampling}, x01, mask)
    net, noise = RecordingEps(), Replay(recorded_draws)
    expected = reference_hetpure(x01, mask, net, noise, stride=stride, u=u)
    assert noise.used == len(recorded_draws)
    assert times == net.times and len(times) == 200 // stride
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("stage_rule, final", [("current", "clean"), ("current", "t0"), ("next", "clean")])
def test_hetpure_earlier_rules_replay_too(recorded_draws, stage_rule, final):
    x01, mask = _inputs(seed=1)
    overrides = {"stride": 20, "stage_rule": stage_rule, "final_step": final}
    out, times, _ = _package("hetpure", overrides, x01, mask)
    net, noise = RecordingEps(), Replay(recorded_draws)
    expected = reference_hetpure(x01, mask, net, noise, stride=20, stage_rule=stage_rule, final=final)
    assert noise.used == len(recorded_draws) and times == net.times
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.fixture
def blend_times(monkeypatch):
    """The times of hetpure's q(x_t | x_in) draws: the forward to t_l, then one per blend."""
    times = []
    original, original_with_noise = hetpure_module.q_sample, hetpure_module.q_sample_with_noise

    def recording(schedule, x0, t, generator=None, noise=None):
        times.append(int(t))
        return original(schedule, x0, t, generator, noise)

    def recording_with_noise(schedule, x0, t, generator=None):  # the forward (it keeps its noise)
        times.append(int(t))
        return original_with_noise(schedule, x0, t, generator)

    monkeypatch.setattr(hetpure_module, "q_sample", recording)
    monkeypatch.setattr(hetpure_module, "q_sample_with_noise", recording_with_noise)
    return times


@pytest.mark.parametrize(
    "rule, blends, calls",
    [
        ({}, [200], [203, 100]),  # the reference: mask-free surrogate (both regions at q(x_200 | x_in))
        ({"stage_rule": "current", "final_step": "clean"}, [200, 100], [203, 103]),  # the earlier rule
    ],
)
def test_two_call_surrogate_blends_only_at_t_l(blend_times, rule, blends, calls):
    x01, mask = _inputs()
    defense = build_defense("hetpure", TinyClassifier().double(), RecordingEps(), rule, seed=0).surrogate(2)
    assert defense.config.stride == 100 and defense._grid() == [200, 100, 0 if not rule else -1]
    with torch.no_grad():
        defense.purify_with_mask(x01, mask)
    assert blend_times == [200] + blends
    assert defense.diffusion.times == calls and defense.nfe == 2


def test_reference_grid_blends_down_to_102_at_stride_2(blend_times):
    x01, mask = _inputs(n=1)
    _, times, _ = _package("hetpure", {}, x01, mask)
    assert blend_times == [200] + list(range(200, 101, -2))  # the step from 100 is stage 2
    assert times[:2] == [203, 201] and times[49:51] == [105, 100] and times[-1] == 2


# --- RePaint ---------------------------------------------------------------------------------------


def repaint_times(n_calls, jump_length, jump_n_sample):
    """RePaint's get_schedule_jump (no second or third jump level): indices n_calls - 1 ... 0 of
    the respaced schedule, jumps back ``jump_length`` at indices 0, L, 2L, ... < n_calls - L,
    jump_n_sample - 1 times each; -1 is the clean image."""
    jumps = {j: jump_n_sample - 1 for j in range(0, n_calls - jump_length, jump_length)}
    t, times = n_calls, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return times + [-1]


def reference_repaint(x01, mask, eps_net, noise, t_l, stride, jump_length, jump_n_sample):
    """RePaint on the grid t_l, t_l - stride, ... (respaced index k is time t_l - (n - 1 - k)
    stride): before each reverse step the known region (mask 0) is a fresh q(x_t | x_in); DDPM
    posterior step of the respaced schedule with x0_hat clipped to [-1, 1]; a jump up one index is
    a draw from q(x_t' | x_t)."""
    x_in = x01 * 2 - 1
    n = len(range(t_l, 0, -stride))
    time = lambda k: -1 if k == -1 else t_l - (n - 1 - k) * stride  # noqa: E731
    x = math.sqrt(abar(t_l)) * x_in + math.sqrt(1 - abar(t_l)) * noise(x_in)
    indices = repaint_times(n, jump_length, jump_n_sample)
    for k_last, k_cur in zip(indices, indices[1:]):
        a, b = time(k_last), time(k_cur)
        if k_cur > k_last:  # jump back up
            ratio = abar(b) / abar(a)
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise(x)
            continue
        known = math.sqrt(abar(a)) * x_in + math.sqrt(1 - abar(a)) * noise(x_in)
        x = x * mask + known * (1 - mask)
        eps = eps_net(x, a)
        x0_hat = ((x - math.sqrt(1 - abar(a)) * eps) / math.sqrt(abar(a))).clamp(-1, 1)
        beta = 1 - abar(a) / abar(b)
        mean = (math.sqrt(abar(b)) * beta / (1 - abar(a))) * x0_hat + (
            math.sqrt(1 - beta) * (1 - abar(b)) / (1 - abar(a))
        ) * x
        x = mean + math.sqrt(beta * (1 - abar(b)) / (1 - abar(a))) * noise(x)
    return ((x + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize(
    "t_l, stride, jump_length, jumps",
    [(40, 10, 2, 2), (40, 10, 1, 3), (60, 10, 4, 1), (200, 20, 1, 1)],
)
def test_repaint_replays_the_reference(recorded_draws, t_l, stride, jump_length, jumps):
    x01, mask = _inputs(seed=2)
    overrides = {"t_l": t_l, "stride": stride, "jump_length": jump_length, "resample_steps": jumps}
    out, times, defense = _package("repaint", overrides, x01, mask)
    net, noise = RecordingEps(), Replay(recorded_draws)
    expected = reference_repaint(x01, mask, net, noise, t_l, stride, jump_length, jump_n_sample=jumps + 1)
    assert noise.used == len(recorded_draws)
    assert times == net.times and len(times) == defense.nfe
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_bad_rules_are_user_errors():
    for setting in ("stage_rule", "final_step", "sampler"):
        with pytest.raises(UserError, match=setting):
            build_defense("hetpure", TinyClassifier(), RecordingEps(), {setting: "previous"})


# --- the full gradient -----------------------------------------------------------------------------


def test_full_gradient_matches_finite_differences():
    # The reference-rule defense at its defaults (100 calls, U = 3, attention mask), float64,
    # noise held fixed by reseeding; the detached mask must not flip under the small steps.
    classifier = TinyClassifier().double().eval().requires_grad_(False)
    defense = build_defense("hetpure", classifier, RecordingEps(), {"mask.tau": 0.6}, seed=3)
    x01, _ = _inputs(seed=4)
    y = torch.tensor([1, 7])

    def loss(x):
        defense.reseed(3)
        return F.cross_entropy(defense(x), y, reduction="sum")

    x = x01.clone().requires_grad_(True)
    gradient, = torch.autograd.grad(loss(x), x)
    random = torch.randn(3, *x01.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    directions = [gradient / gradient.norm(), *random]
    mask, h = defense.mask(x01), 1e-5
    assert 0 < mask.mean() < 1
    with torch.no_grad():
        for d in directions:
            assert torch.equal(defense.mask(x01 + h * d), mask) and torch.equal(defense.mask(x01 - h * d), mask)
            numeric = (loss(x01 + h * d) - loss(x01 - h * d)).item() / (2 * h)
            analytic = (gradient * d).sum().item()
            # Relative to |grad| |d|, the largest directional derivative along d (a random
            # direction's own derivative can be arbitrarily small); the first d is the gradient's.
            assert abs(numeric - analytic) < 1e-6 * gradient.norm().item() * d.norm().item(), (numeric, analytic)
