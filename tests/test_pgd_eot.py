import pytest
import torch
from torch import nn

from hetpure_bench.attacks.pgd_eot import PGDEOT
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


def test_eot_runs_as_one_batched_pass():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.zeros(x.shape[0], 2) + x.flatten(1).sum(1, keepdim=True)

    PGDEOT(eps=0.1, steps=3, eot=5).perturb(Spy(), torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    assert seen == [10, 10, 10]


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
