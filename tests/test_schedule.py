import math

import pytest
import torch

from hetpure_bench.diffusion.schedule import (
    CLEAN,
    VPSchedule,
    ddim_step,
    ddpm_mean_variance,
    ddpm_posterior_step,
    ddpm_step,
    predict_x0,
    q_forward,
    q_sample,
    timestep_grid,
)

S = VPSchedule()


def test_alpha_bar_matches_hand_computed_values():
    # prod_{i<=t} (1 - beta_i) with beta_i = 1e-4 + i * (0.02 - 1e-4) / 999, computed by hand in float64.
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    expected = math.prod(1 - b for b in betas[:101])
    assert S.alpha_bar(100).item() == pytest.approx(expected, rel=1e-12)
    assert S.alpha_bar(100).item() == pytest.approx(0.895, abs=5e-4)
    assert S.alpha_bar(200).item() == pytest.approx(0.656, abs=5e-4)
    assert S.alpha_bar(0).item() == pytest.approx(1 - 1e-4)
    assert S.alpha_bar(CLEAN).item() == 1.0
    assert S.betas[-1].item() == pytest.approx(0.02)


def test_discrete_schedule_matches_vp_sde():
    # abar(t*) of the VP-SDE with beta_min 0.1, beta_max 20: exp(-t^2 (bmax - bmin) / 2 - t bmin).
    continuous = math.exp(-0.5 * 0.1**2 * 19.9 - 0.1 * 0.1)
    assert S.alpha_bar(100).item() == pytest.approx(continuous, abs=2e-3)


def test_out_of_range_timestep_is_an_error():
    with pytest.raises(ValueError):
        S.alpha_bar(1000)
    with pytest.raises(ValueError):
        S.alpha_bar(-2)


def test_q_sample_formula_and_per_sample_t():
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 200])
    x_t = q_sample(S, x0, t, noise=noise)
    for i, ti in enumerate(t.tolist()):
        a = S.alpha_bar(ti).item()
        torch.testing.assert_close(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])


def test_noise_comes_from_the_generator_only():
    x0 = torch.zeros(2, 3, 8, 8)
    a = q_sample(S, x0, 50, torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # reseeding the global RNG (as AutoAttack does) must change nothing
    b = q_sample(S, x0, 50, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, q_sample(S, x0, 50, torch.Generator().manual_seed(2)))


def test_q_forward_has_the_composed_marginal():
    # x_100 from q(x_100 | x0) then q(x_130 | x_100) must be distributed as q(x_130 | x0).
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x_130 = q_forward(S, q_sample(S, x0, 100, g), 100, 130, g)
    a = S.alpha_bar(130).item()
    assert x_130.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=5e-3)
    assert x_130.var().item() == pytest.approx(1 - a, rel=2e-2)
    with pytest.raises(ValueError):
        q_forward(S, x0, 130, 100, g)


def test_ddim_with_true_noise_is_exact():
    # With the true eps, a DDIM step lands exactly on q(x_s | x0) with the same noise, and the
    # step to CLEAN returns x0: the update rule itself adds no error.
    x0, noise = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    x_200 = q_sample(S, x0, 200, noise=noise)
    torch.testing.assert_close(ddim_step(S, x_200, 200, 100, noise), q_sample(S, x0, 100, noise=noise))
    torch.testing.assert_close(ddim_step(S, x_200, 200, CLEAN, noise), x0)
    torch.testing.assert_close(predict_x0(S, x_200, 200, noise), x0)


def test_ddim_step_hand_computed():
    x_t, eps = torch.tensor([0.5]), torch.tensor([0.2])
    a_t, a_s = S.alpha_bar(10).item(), S.alpha_bar(5).item()
    x0_hat = (0.5 - math.sqrt(1 - a_t) * 0.2) / math.sqrt(a_t)
    expected = math.sqrt(a_s) * x0_hat + math.sqrt(1 - a_s) * 0.2
    assert ddim_step(S, x_t, 10, 5, eps).item() == pytest.approx(expected, rel=1e-6)


def test_ddpm_step_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    t = 50
    x_t = torch.full((400_000,), 0.3, dtype=torch.float64)
    eps = torch.full_like(x_t, -0.4)
    beta, a_t, a_prev = S.beta(t).item(), S.alpha_bar(t).item(), S.alpha_bar(t - 1).item()
    mean = (0.3 + beta / math.sqrt(1 - a_t) * 0.4) / math.sqrt(1 - beta)
    small = ddpm_step(S, x_t, t, eps, g, variance="small")
    large = ddpm_step(S, x_t, t, eps, g, variance="large")
    assert small.mean().item() == pytest.approx(mean, abs=2e-4)
    assert small.var().item() == pytest.approx(beta * (1 - a_prev) / (1 - a_t), rel=2e-2)
    assert large.var().item() == pytest.approx(beta, rel=2e-2)
    # The last step (t = 0) adds no noise for either choice.
    x0 = torch.randn(5, dtype=torch.float64)
    assert torch.equal(ddpm_step(S, x0, 0, eps[:5], g, "small"), ddpm_step(S, x0, 0, eps[:5], g, "large"))
    with pytest.raises(ValueError):
        ddpm_step(S, x0, 3, eps[:5], g, variance="medium")


def test_fixedlarge_variance_and_clipped_x0_mean_hand_computed():
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    abar = [math.prod(1 - b for b in betas[: i + 1]) for i in range(8)]
    beta_tilde_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    x_t = torch.tensor([0.3, 0.99, -0.98], dtype=torch.float64)
    eps = torch.tensor([-0.4, -0.5, 0.6], dtype=torch.float64)
    t = torch.tensor([5, 5, 5])
    _, var = ddpm_mean_variance(S, x_t, torch.tensor([0, 5, 7]), eps, variance="fixedlarge")
    assert var.tolist() == pytest.approx([beta_tilde_1, betas[5], betas[7]], rel=1e-12)
    mean, _ = ddpm_mean_variance(S, x_t, t, eps, clip_x0=True)
    expected = []
    for x, e in zip(x_t.tolist(), eps.tolist()):
        x0 = min(1.0, max(-1.0, (x - math.sqrt(1 - abar[5]) * e) / math.sqrt(abar[5])))
        coef_x0, coef_xt = betas[5] * math.sqrt(abar[4]), (1 - abar[4]) * math.sqrt(1 - betas[5])
        expected.append((coef_x0 * x0 + coef_xt * x) / (1 - abar[5]))
    assert mean.tolist() == pytest.approx(expected, rel=1e-12)
    # Where x0_hat is inside [-1,1] (the first entry) the two mean formulas agree; at t = 0 the
    # clipped mean is the clamped x0_hat.
    unclipped, _ = ddpm_mean_variance(S, x_t, t, eps)
    assert mean[0].item() == pytest.approx(unclipped[0].item(), rel=1e-12)
    assert mean[1].item() != pytest.approx(unclipped[1].item(), rel=1e-6)
    last, _ = ddpm_mean_variance(S, x_t, 0, eps, clip_x0=True)
    torch.testing.assert_close(last, predict_x0(S, x_t, 0, eps).clamp(-1, 1))


def test_ddpm_last_step_returns_x0_prediction():
    x_t, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(ddpm_step(S, x_t, 0, eps, None), predict_x0(S, x_t, 0, eps))


@pytest.mark.parametrize(
    "t_start, stride, expected",
    [(100, 10, [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, -1]), (200, 100, [200, 100, -1]), (5, 2, [5, 3, 1, -1])],
)
def test_timestep_grid(t_start, stride, expected):
    assert timestep_grid(t_start, stride) == expected


def test_timestep_grid_call_count():
    assert len(timestep_grid(200, 2)) - 1 == 100  # the reference's 100-call defense grid
    with pytest.raises(ValueError):
        timestep_grid(0, 2)


def test_timestep_grid_ending_at_t0():
    # The heterogeneous-noise reference: calls at 200, 198, ..., 2 and the last step lands at 0.
    assert timestep_grid(200, 2, end=0) == list(range(200, -1, -2))
    assert timestep_grid(200, 100, end=0) == [200, 100, 0]
    assert timestep_grid(5, 2, end=0) == [5, 3, 1, 0]
    with pytest.raises(ValueError):
        timestep_grid(200, 2, end=1)


def test_ddpm_posterior_step_adjacent_is_the_ddpm_step():
    # s = t - 1 with x0_hat inside [-1, 1] (no clipping): DDPM's step with the posterior variance.
    t = 30
    x_t = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64)
    eps = torch.linspace(0.3, -0.2, 6, dtype=torch.float64)
    assert predict_x0(S, x_t, t, eps).abs().max() < 1
    a = ddpm_posterior_step(S, x_t, t, t - 1, eps, torch.Generator().manual_seed(1))
    b = ddpm_step(S, x_t, t, eps, torch.Generator().manual_seed(1), variance="small")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ddpm_posterior_step_strided_hand_computed():
    # The respaced DDPM step 40 -> 30: beta = 1 - abar_40 / abar_30; x0_hat clipped to [-1, 1].
    x_t, eps = torch.tensor([2.0, 0.1], dtype=torch.float64), torch.tensor([0.1, -0.3], dtype=torch.float64)
    a_t, a_s = S.alpha_bar(40).item(), S.alpha_bar(30).item()
    beta = 1 - a_t / a_s
    x0 = [max(-1.0, min(1.0, (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t))) for x, e in zip([2.0, 0.1], [0.1, -0.3])]
    assert x0[0] == 1.0  # clipped
    noise = torch.randn(2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = [
        math.sqrt(a_s) * beta / (1 - a_t) * x0[i] + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x
        + math.sqrt(beta * (1 - a_s) / (1 - a_t)) * noise[i].item()
        for i, x in enumerate([2.0, 0.1])
    ]
    out = ddpm_posterior_step(S, x_t, 40, 30, eps, torch.Generator().manual_seed(2))
    assert out.tolist() == pytest.approx(expected, rel=1e-12)
    # Landing on the clean image: no noise, the clipped x0 prediction.
    clean = ddpm_posterior_step(S, x_t, 40, CLEAN, eps, torch.Generator().manual_seed(2))
    assert clean.tolist() == pytest.approx(x0, rel=1e-12)


def test_transitions_are_differentiable():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def chain(x, eps):
        g = torch.Generator().manual_seed(0)
        y = q_forward(S, q_sample(S, x, 100, g), 100, 103, g)
        return ddpm_step(S, ddim_step(S, y, 103, 50, eps), 50, eps, g)

    assert torch.autograd.gradcheck(chain, (x, eps))
