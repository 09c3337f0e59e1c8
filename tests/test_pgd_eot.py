import pytest
import torch
import torch.nn.functional as F
from linear_models import FixedDefense
from tiny_models import tiny_models
from torch import nn

from hetpure_bench.attacks.pgd_eot import PGDEOT
from hetpure_bench.attacks.threat import project, uniform_in_ball
from hetpure_bench.diffusion.noise import randn_like
from hetpure_bench.errors import UserError


class Linear2(nn.Module):
    """Two-class linear model: logit margin w.x + b, so the optimal attacks are closed-form."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        margin = (x.flatten(1) * self.w.flatten()).sum(1) + self.b
        return torch.stack([margin, -margin], 1)  # class 0 when the margin is positive


def _setup():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 3, 4, 4, generator=g)
    x = 0.3 + 0.4 * torch.rand(2, 3, 4, 4, generator=g)  # away from the [0,1] box edges
    return Linear2(w), x, torch.zeros(2, dtype=torch.long)


def test_linf_pgd_reaches_the_closed_form_optimum():
    model, x, y = _setup()
    eps = 0.05
    x_adv = PGDEOT(eps=eps, step_size=0.01, steps=10, eot=1).perturb(model, x, y)
    torch.testing.assert_close(x_adv, x - eps * model.w.sign().expand_as(x))


def test_l2_pgd_reaches_the_closed_form_optimum():
    model, x, y = _setup()
    eps = 0.3
    x_adv = PGDEOT(norm="L2", eps=eps, step_size=0.1, steps=10, eot=1).perturb(model, x, y)
    direction = model.w / model.w.norm()
    torch.testing.assert_close(x_adv, x - eps * direction.expand_as(x), atol=1e-5, rtol=1e-5)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-6).all()


def test_eot_runs_as_one_batched_pass_and_the_returned_iterate_gets_a_forward_only_check():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append((x.shape[0], torch.is_grad_enabled()))
            return torch.zeros(x.shape[0], 2) + x.flatten(1).sum(1, keepdim=True)

    PGDEOT(eps=0.1, steps=3, eot=5).perturb(Spy(), torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    assert seen == [(10, True)] * 3 + [(10, False)]


def test_random_start_stays_in_the_ball_and_box():
    model, x, y = _setup()
    for norm, eps in (("Linf", 0.05), ("L2", 0.5)):
        x_adv = PGDEOT(norm=norm, eps=eps, steps=0, eot=1, random_start=True).perturb(model, x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-6).all() and (size > 0).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_eps_zero_is_the_identity_and_bad_settings_are_refused():
    model, x, y = _setup()
    assert torch.equal(PGDEOT(eps=0.0, steps=5, eot=1).perturb(model, x, y), x)
    with pytest.raises(UserError):
        PGDEOT(norm="L1")
    with pytest.raises(UserError):
        PGDEOT(eot=0)


# ---------------------------------------------------------------- the history leaves the examples as they were


def _plain_pgd_eot(attack: PGDEOT, model, x, y):
    """PGD-EOT as it was before it recorded a history, written out: from x (or a seeded random
    start), ``steps`` ascent steps on the cross-entropy summed over the batched EOT copies."""
    x_adv = x.clone()
    if attack.random_start:
        start = x + uniform_in_ball(x, attack.norm, attack.eps, torch.Generator().manual_seed(attack.seed))
        x_adv = project(start, x, attack.norm, attack.eps)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv.repeat(attack.eot, 1, 1, 1)), y.repeat(attack.eot), reduction="sum")
        grad, = torch.autograd.grad(loss, x_adv)
        if attack.norm == "Linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x_adv = project(x_adv.detach() + attack.step_size * step, x, attack.norm, attack.eps)
    return x_adv.detach()


class NoisyPurifier(FixedDefense):
    """Identity plus Gaussian noise from the defense's own per-image streams: every EOT copy and
    every pass draws new noise."""

    def purify(self, x01):
        return x01 + 0.1 * randn_like(x01, self.generator(x01))


@pytest.mark.parametrize("norm, eps, random_start", [("Linf", 8 / 255, False), ("Linf", 8 / 255, True), ("L2", 0.5, True)])
def test_the_examples_equal_the_plain_loop_bit_for_bit_on_a_stochastic_defense(norm, eps, random_start):
    classifier, _ = tiny_models()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = classifier(x).argmax(1)
    defense = NoisyPurifier(classifier, None, seed=[1, 2, 3])
    attack = PGDEOT(norm=norm, eps=eps, step_size=eps / 4, steps=4, eot=2, random_start=random_start)
    expected = _plain_pgd_eot(attack, defense, x, y)
    defense.reseed([1, 2, 3])
    x_adv = attack.perturb(defense, x, y)
    assert torch.equal(x_adv, expected)
    assert not torch.equal(x_adv, x)


# ---------------------------------------------------------------- the history


def test_the_history_is_the_check_of_every_iterate_on_a_linear_model():
    """Linf sign steps of s lower the margin w.x + b by s ||w||_1 per step (inside the ball and
    the box), so iterate k's margin is m_0 - k s ||w||_1: image 0, placed 2.5 steps from the
    boundary, survives the checks of iterates 0..2 and not those of 3..6 (the returned one)."""
    model, x, y = _setup()
    s, steps = 0.01, 6
    per_step = s * model.w.abs().sum()
    model.b = float(-(model.w * x[0]).sum() + 2.5 * per_step)
    x_adv, history = PGDEOT(eps=steps * s, step_size=s, steps=steps, eot=3).perturb_with_history(model, x, y)
    margins = (x.flatten(1) * model.w.flatten()).sum(1) + model.b - torch.arange(steps + 1).unsqueeze(1) * per_step
    assert history.robust.shape == history.best_loss.shape == history.step_size.shape == (steps + 1, 2)
    assert torch.equal(history.robust, margins > 0)
    assert history.robust[:, 0].tolist() == [True] * 3 + [False] * 4
    torch.testing.assert_close(history.best_loss, F.softplus(-2 * margins))  # CE of logits (m, -m), label 0
    assert torch.equal(history.step_size, torch.full((steps + 1, 2), s))
    assert torch.equal(history.robust[-1], model(x_adv).argmax(1) == y)  # the last record is the returned iterate


class FirstCopiesRight(nn.Module):
    """Of the EOT copies of each of ``images`` images (row copy * images + image), the first
    ``right`` are classified right (class 0), the others not."""

    def __init__(self, images: int, right: int):
        super().__init__()
        self.images, self.right = images, right

    def forward(self, x):
        score = x.flatten(1).sum(1) + 1
        signed = torch.where(torch.arange(len(x)) // self.images < self.right, score, -score)
        return torch.stack([signed, -signed], 1)


@pytest.mark.parametrize("right, robust", [(2, False), (3, True)])
def test_the_own_check_needs_more_than_half_the_copies_correct(right, robust):
    x = torch.rand(3, 1, 2, 2)
    attack = PGDEOT(eps=0.01, steps=2, eot=4)
    _, history = attack.perturb_with_history(FirstCopiesRight(3, right), x, torch.zeros(3, dtype=torch.long))
    assert history.robust.shape == (3, 3) and (history.robust == robust).all()  # 2 of 4 is no majority, 3 is


def test_no_step_makes_no_model_call_and_records_nothing():
    class Refusing(nn.Module):
        def forward(self, x):
            raise AssertionError("called")

    x = torch.rand(3, 1, 2, 2)
    x_adv, history = PGDEOT(eps=0.01, steps=0, eot=2).perturb_with_history(Refusing(), x, torch.zeros(3, dtype=torch.long))
    assert torch.equal(x_adv, x) and history is None
