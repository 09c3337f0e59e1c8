import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from test_defenses import CountingModel
from tiny_models import tiny_models

from hetpure_bench.defenses import build_defense
from hetpure_bench.defenses.gdmp import guidance_scale, similarity
from hetpure_bench.defenses.ssim import ssim
from hetpure_bench.diffusion.schedule import VPSchedule
from hetpure_bench.errors import UserError

S = VPSchedule()


def test_guidance_scale_hand_computed():
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    abar_10 = math.prod(1 - b for b in betas[:11])
    expected = 70000 * (3 * 255 / (2 * 8)) * math.sqrt(1 - abar_10) / math.sqrt(abar_10)
    assert guidance_scale(S, 10, 70000, 8) == pytest.approx(expected, rel=1e-9)
    assert guidance_scale(S, 10, 60000, 4) == pytest.approx(expected * 60000 / 70000 * 2, rel=1e-9)


def _reference_ssim(a: np.ndarray, b: np.ndarray, mode: str = "valid") -> float:
    """Wang et al.'s SSIM, written independently with scipy's 2-D convolution ('valid', or
    'same': zero-padded, every position)."""
    coords = np.arange(11) - 5.0
    g = np.exp(-coords**2 / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(a.shape[0]):
        x, y = a[ch], b[ch]
        mx, my = convolve2d(x, window, mode), convolve2d(y, window, mode)
        vx = convolve2d(x * x, window, mode) - mx**2
        vy = convolve2d(y * y, window, mode) - my**2
        cxy = convolve2d(x * y, window, mode) - mx * my
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


def test_same_padded_ssim_matches_an_independent_reference():
    rng = np.random.RandomState(1)
    a = rng.rand(2, 3, 8, 8) * 2 - 1  # [-1,1] images, smaller than the window: only "same" works
    b = np.clip(a + 0.2 * rng.randn(2, 3, 8, 8), -1, 1)
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b), padding="same")
    for i in range(2):
        assert ours[i].item() == pytest.approx(_reference_ssim(a[i], b[i], "same"), rel=1e-9)
    default = similarity("ssim", torch.from_numpy(a), torch.from_numpy(b))  # GDMP's: "same", on [-1,1]
    assert default.tolist() == pytest.approx(ours.tolist(), rel=1e-12)
    with pytest.raises(ValueError):
        ssim(torch.from_numpy(a), torch.from_numpy(b), padding="reflect")


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
    # Scale 3e8 / 100 (the reference's batch): guidance as strong as the per-image sum at 3e6.
    settings = {"t_guide": 3, "iterations": 1, "paths": 1, "similarity": "mse", "scale": 3e8}
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


# ---- Replay of the official algorithm ------------------------------------------------------------
# A plain re-implementation of GDMP's official CIFAR-10 purification (METHOD.md), with no helpers
# from the package, driven with the package's own recorded noise and the same eps-network.

REFERENCE_BATCH = 100  # the official code's batch size: its similarity is a mean over 100 images


@pytest.fixture
def recorded_noise(monkeypatch):
    """Every noise tensor the package draws, in order (noise._draw serves all its draws)."""
    from hetpure_bench.diffusion import noise

    draws, draw = [], noise._draw

    def recording(sample, x, generator):
        out = draw(sample, x, generator)
        draws.append(out.detach().clone())
        return out

    monkeypatch.setattr(noise, "_draw", recording)
    return draws


class RecordingClassifier(torch.nn.Module):
    """The tiny classifier, keeping the purified images it is given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def _plain_ssim_map(a, b, valid):
    # pytorch_ssim's computation: 11x11 Gaussian window (sigma 1.5), zero padding 5 ("same").
    g = torch.tensor([math.exp(-((k - 5) ** 2) / (2 * 1.5**2)) for k in range(11)], dtype=a.dtype)
    g = g / g.sum()
    channels = a.shape[1]
    w = torch.outer(g, g).expand(channels, 1, 11, 11)

    def conv(z):
        return torch.nn.functional.conv2d(z, w, padding=0 if valid else 5, groups=channels)

    mu1, mu2 = conv(a), conv(b)
    s11, s22, s12 = conv(a * a) - mu1**2, conv(b * b) - mu2**2, conv(a * b) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))


def _reference_gdmp(
    eps_net, x01, draws, *, t_guide=36, iterations=4, similarity="mse", scale=None, ptb=8.0, per_image_sum=False,
    variance="fixedlarge", clip_x0=True, noise_to_first_call=False, ssim_valid=False, ssim_unit=False, guided=True,
):
    """GDMP on the rows x01 ([0,1]) with the package's noise ``draws`` replayed in order.

    Faithful mode: the similarity is the mean over a batch of 100, exactly as the official code
    computes it: the rows, joined by other images (fixed, since an image's gradient does not
    depend on the others). The flags reproduce the project's pre-M9 behaviour; ``guided=False``
    switches the guidance off (the official config's `cond: false`). Returns [0,1] images and
    whether any x0 prediction left [-1,1].
    """
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    logvar = torch.log(torch.cat([post_var[1:2], (post_var if variance == "clipped" else betas)[1:]]))
    coef1 = betas * abar_prev.sqrt() / (1 - abar)
    coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
    guide = scale if scale is not None else {"mse": 60000.0, "ssim": 70000.0}[similarity]
    m = ptb * 2 / 255.0 / 3.0 / guide

    rows = x01.shape[0]
    others = torch.rand((2, REFERENCE_BATCH - rows, *x01.shape[1:]), generator=torch.Generator().manual_seed(1))
    others = others.to(x01.dtype) * 2 - 1
    queue = iter(draws)

    def sim(x, y):
        if not per_image_sum:  # the official batch: these rows and the other images
            x, y = torch.cat([x, others[0]]), torch.cat([y, others[1]])
        if similarity == "mse":
            values = -((x - y) ** 2)
        else:
            if ssim_unit:
                x, y = (x + 1) / 2, (y + 1) / 2
            values = _plain_ssim_map(x, y, ssim_valid)
        # The official F.mse_loss and pytorch_ssim average over the whole batch.
        return values.flatten(1).mean(1).sum() if per_image_sum else values.mean()

    x_adv = x01 * 2 - 1
    x, clamped = x_adv, False
    for _ in range(iterations):
        level = t_guide - 1 if noise_to_first_call else t_guide
        x = abar[level].sqrt() * x + (1 - abar[level]).sqrt() * next(queue)
        for i in reversed(range(t_guide)):
            x_adv_t = abar[i].sqrt() * x_adv + (1 - abar[i]).sqrt() * next(queue)
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                grad = torch.autograd.grad(sim(x_in, x_adv_t), x_in)[0]
            cond = grad * (1 - abar[i]).sqrt() / (m * abar[i].sqrt()) if guided else 0.0
            eps = eps_net(x, i)
            x0 = (1 / abar[i]).sqrt() * x - (1 / abar[i] - 1).sqrt() * eps
            clamped |= bool((x0.abs() > 1).any())
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            mean = coef1[i] * x0 + coef2[i] * x + logvar[i].exp() * cond
            # The official code also draws noise at i = 0 and multiplies it by 0: not drawn here.
            x = mean + (logvar[i] / 2).exp() * next(queue) if i > 0 else mean
    assert next(queue, None) is None  # every draw of the package replayed
    return ((x + 1) / 2).clamp(0, 1), clamped


def _package_purified(settings, x01, seed=0):
    """The package's purified rows (all paths, as its classifier saw them) and its eps-network."""
    classifier, diffusion = tiny_models(dtype=torch.float64)
    recorder = RecordingClassifier(classifier)
    defense = build_defense("gdmp", recorder, diffusion, settings, seed=seed)
    with torch.no_grad():
        logits = defense(x01)
    paths = defense.config.paths
    torch.testing.assert_close(logits, classifier(recorder.inputs[0]).view(paths, x01.shape[0], -1).mean(0))
    return recorder.inputs[0], diffusion


def _replay(settings, x01, recorded_noise, measure_guidance=True, **reference_flags):
    """The package's purified rows and the reference's with the same noise, whether the reference
    clamped an x0 prediction, and (``measure_guidance``: one more reference run) how much the guidance
    moved the reference's result."""
    purified, diffusion = _package_purified(settings, x01)
    rows = x01.repeat(settings.get("paths", 10), 1, 1, 1)
    same = {k: v for k, v in settings.items() if k in ("t_guide", "iterations", "similarity", "scale")}
    with torch.no_grad():
        expected, clamped = _reference_gdmp(diffusion, rows, recorded_noise, **same, **reference_flags)
        if not measure_guidance:
            return purified, expected, clamped, None
        unguided, _ = _reference_gdmp(diffusion, rows, recorded_noise, **same, **reference_flags, guided=False)
    return purified, expected, clamped, (expected - unguided).abs().max().item()


def _images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["mse", "ssim"])
def test_gdmp_replays_the_official_algorithm(kind, recorded_noise):
    settings = {"t_guide": 6, "iterations": 2, "paths": 2, "similarity": kind}
    purified, expected, clamped, guidance_effect = _replay(settings, _images(2, 8), recorded_noise)
    assert clamped and guidance_effect > 1e-6  # the x0 clamp and the guidance are exercised
    torch.testing.assert_close(purified, expected, rtol=0, atol=1e-10)


def test_default_gdmp_replays_the_official_algorithm(recorded_noise):
    # The defaults: MSE at 60000, 36 steps after noising to alpha_bar(36), 4 iterations, 10 paths.
    purified, expected, clamped, _ = _replay({}, _images(1, 8, seed=1), recorded_noise, measure_guidance=False)
    assert purified.shape == (10, 3, 8, 8) and clamped
    torch.testing.assert_close(purified, expected, rtol=0, atol=1e-10)


LEGACY = {
    "guidance_batch": 1, "variance": "clipped", "clip_x0": False, "noise_level": "first_call",
    "ssim_window": "valid", "ssim_images": "unit",
}


@pytest.mark.parametrize("kind", ["mse", "ssim"])
def test_pre_m9_options_replay_the_per_image_sum_variant(kind, recorded_noise):
    # The project's earlier GDMP stays reachable: per-image similarity sum, clipped small
    # variance, no x0 clamp, noise to the first call's level, SSIM 'valid' on [0,1] images.
    settings = {"t_guide": 5, "iterations": 2, "paths": 2, "similarity": kind, "scale": 300.0, **LEGACY}
    flags = dict(
        per_image_sum=True, variance="clipped", clip_x0=False, noise_to_first_call=True, ssim_valid=True, ssim_unit=True
    )
    purified, expected, _, guidance_effect = _replay(settings, _images(2, 12), recorded_noise, **flags)
    assert guidance_effect > 1e-6
    torch.testing.assert_close(purified, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["mse", "ssim"])
def test_an_image_is_purified_the_same_alone_and_in_a_batch(kind):
    classifier, diffusion = tiny_models(dtype=torch.float64)
    settings = {"t_guide": 4, "iterations": 2, "paths": 2, "similarity": kind}
    defense = build_defense("gdmp", classifier, diffusion, settings)
    x = _images(3, 8, seed=2)
    with torch.no_grad():
        defense.reseed([10, 11, 12])
        batch = defense.purify(x.repeat(2, 1, 1, 1)).view(2, 3, 3, 8, 8)
        defense.reseed([10, 11, 12])
        batch_logits = defense(x)
        defense.reseed([11])
        alone = defense.purify(x[1:2].repeat(2, 1, 1, 1))
        defense.reseed([11])
        alone_logits = defense(x[1:2])
    torch.testing.assert_close(batch[:, 1], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(batch_logits[1:2], alone_logits, rtol=0, atol=1e-12)


def test_guidance_batch_divides_the_guidance():
    # guidance_batch = 1 at scale s equals the default (1/100) at scale 100 s, draw for draw.
    classifier, diffusion = tiny_models(dtype=torch.float64)
    x = _images(2, 8, seed=3)
    settings = {"t_guide": 4, "iterations": 1, "paths": 1}
    outs = []
    for extra in ({"scale": 500.0, "guidance_batch": 1}, {"scale": 50000.0}):
        defense = build_defense("gdmp", classifier, diffusion, {**settings, **extra}, seed=0)
        with torch.no_grad():
            outs.append(defense.purify(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)


def test_label_says_when_gdmp_is_reduced_or_modified():
    from hetpure_bench.bench.spec import spec_from_preset

    classifier, diffusion = tiny_models()
    default = build_defense("gdmp", classifier, diffusion)
    assert not default.describe().startswith(("reduced", "modified"))
    assert default.describe().startswith("t_guide=36 iterations=4 paths=10 similarity=mse")

    smoke = build_defense("gdmp", classifier, diffusion, spec_from_preset("smoke", "gdmp").defense_overrides)
    assert smoke.describe().startswith("reduced(t_guide=10/36,iterations=1/4,paths=1/10) t_guide=10 ")
    assert "modified" not in smoke.describe()

    changed = {"similarity": "ssim", "guidance_batch": 1, "t_guide": 50}
    label = build_defense("gdmp", classifier, diffusion, changed).describe()
    assert label.startswith("modified(t_guide=50/36,similarity=ssim/mse,scale=70000.0/60000.0,guidance_batch=1/100) ")
    assert build_defense("gdmp", classifier, diffusion, {"scale": 60000.0}).describe() == default.describe().replace(
        "scale=None", "scale=60000.0"
    )
    assert default.surrogate(2).describe().startswith("reduced(t_guide=2/36,iterations=1/4,paths=1/10) ")


def test_bad_reference_options():
    classifier, diffusion = tiny_models()
    for bad in ({"variance": "medium"}, {"noise_level": "t_guide+1"}, {"ssim_window": "reflect"},
                {"ssim_images": [0, 1]}, {"guidance_batch": 0}, {"guidance_batch": "all"}, {"clip_x0": "yes"},
                {"t_guide": 1000}):
        with pytest.raises(UserError):
            build_defense("gdmp", classifier, diffusion, bad)
