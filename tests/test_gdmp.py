import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from hetpure_bench.defenses import build_defense
from hetpure_bench.defenses.gdmp import guidance_scale, similarity
from hetpure_bench.diffusion.schedule import VPSchedule
from hetpure_bench.errors import UserError
from hetpure_bench.ssim import ssim
from test_defenses import CountingModel
from tiny_models import tiny_models

S = VPSchedule()


def test_guidance_scale_hand_computed():
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    abar_10 = math.prod(1 - b for b in betas[:11])
    expected = 70000 * (3 * 255 / (2 * 8)) * math.sqrt(1 - abar_10) / math.sqrt(abar_10)
    assert guidance_scale(S, 10, 70000, 8) == pytest.approx(expected, rel=1e-9)
    assert guidance_scale(S, 10, 60000, 4) == pytest.approx(expected * 60000 / 70000 * 2, rel=1e-9)


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM, written independently with scipy's 2-D convolution ('valid')."""
    coords = np.arange(11) - 5.0
    g = np.exp(-coords**2 / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[0]):
        x, y = a[ch], b[ch]
        mx, my = convolve2d(x, window, "valid"), convolve2d(y, window, "valid")
        vx = convolve2d(x * x, window, "valid") - mx**2
        vy = convolve2d(y * y, window, "valid") - my**2
        cxy = convolve2d(x * y, window, "valid") - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_an_independent_reference():
    rng = np.random.RandomState(0)
    a = rng.rand(2, 3, 16, 16)
    b = np.clip(a + 0.1 * rng.randn(2, 3, 16, 16), 0, 1)
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(2):
        assert ours[i].item() == pytest.approx(_reference_ssim(a[i], b[i]), rel=1e-9)
    assert ssim(torch.from_numpy(a), torch.from_numpy(a)).tolist() == pytest.approx([1.0, 1.0])


def test_mse_similarity():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert similarity("mse", x, y).item() == pytest.approx(-0.25)


def test_nfe_counts_every_path_and_iteration():
    classifier, diffusion = tiny_models()
    counting = CountingModel(diffusion)
    defense = build_defense("gdmp", classifier, counting, {"t_guide": 3, "iterations": 2, "paths": 4})
    assert defense.nfe == 3 * 2 * 4
    with torch.no_grad():
        logits = defense(torch.rand(2, 3, 16, 16))
    assert logits.shape == (2, 10)
    assert counting.calls == 3 * 2  # the 4 paths run as one batch: 6 batched calls = 24 per image
    assert build_defense("gdmp", classifier, diffusion).nfe == 36 * 4 * 10


def test_guidance_pulls_towards_the_input():
    classifier, diffusion = tiny_models()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    changes = {}
    for scale in (0.0, 60000.0):
        defense = build_defense("gdmp", classifier, diffusion, {"t_guide": 20, "iterations": 1, "similarity": "mse", "scale": scale}, seed=0)
        with torch.no_grad():
            changes[scale] = (defense.purify(x) - x).abs().mean().item()
    assert changes[60000.0] < changes[0.0]


def test_full_gradient_includes_the_guidance_term():
    # gradcheck compares autograd with finite differences: it only passes if the gradient
    # through the guidance term (second order) is included.
    # The whole purification's gradient equals finite differences, guidance included.
    classifier, diffusion = tiny_models(dtype=torch.float64)
    settings = {"t_guide": 3, "iterations": 1, "paths": 1, "similarity": "mse", "scale": 3e6}
    defense = build_defense("gdmp", classifier, diffusion, settings, seed=0)
    x = (0.25 + 0.5 * torch.rand(1, 3, 12, 12, dtype=torch.float64)).requires_grad_(True)

    def purify(x):
        defense.reseed(0)
        return defense.purify(x)

    with torch.no_grad():
        out = purify(x)
    assert 0 < out.min() and out.max() < 1  # no clipping: the gradient is not trivially zero
    assert torch.autograd.gradcheck(purify, (x,), atol=1e-6, rtol=1e-4, fast_mode=True)


def test_guided_step_differentiates_the_guidance_through_the_input():
    # With x_t held fixed, a guided step depends on the input only through the guidance
    # gradient grad_x sim(x_t, q(input)_t): a first-order-only backprop would give zero here.
    from hetpure_bench.diffusion.sampling import NetworkCaller

    classifier, diffusion = tiny_models(dtype=torch.float64)
    defense = build_defense("gdmp", classifier, diffusion, {"similarity": "ssim"}, seed=0)
    x_t = torch.randn(1, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(1, 3, 12, 12, dtype=torch.float64) * 2 - 1).requires_grad_(True)

    def step(target):
        return defense._guided_step(x_t, 5, target, NetworkCaller(diffusion), torch.Generator().manual_seed(0))

    grad, = torch.autograd.grad(step(target).sum(), target)
    assert grad.abs().sum() > 0
    assert torch.autograd.gradcheck(step, (target,), atol=1e-6, rtol=1e-4, fast_mode=True)


def test_bad_gdmp_settings():
    classifier, diffusion = tiny_models()
    with pytest.raises(UserError):
        build_defense("gdmp", classifier, diffusion, {"similarity": "lpips"})
    with pytest.raises(UserError):
        build_defense("gdmp", classifier, diffusion, {"paths": 0})
