import pytest
import torch
from linear_models import FixedDefense, linear_problem, linf_breakable
from tiny_models import tiny_models
from torch import nn

from hetpure_bench.attacks import attack_label, build_attacks, mask_temperature
from hetpure_bench.attacks.autoattack import AutoAttackSuite, set_apgd_iterations
from hetpure_bench.attacks.gradients import BPDA, attack_model
from hetpure_bench.attacks.threat import perturbation_size
from hetpure_bench.attacks.torchattacks_adapter import TorchAttack
from hetpure_bench.defenses import build_defense
from hetpure_bench.diffusion.noise import randn_like
from hetpure_bench.errors import UserError

EPS = 0.03


def _robust(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def test_autoattack_reaches_the_closed_form_robust_accuracy_of_a_linear_model():
    model, x, y = linear_problem(n=16)
    breakable = linf_breakable(model, x, y, EPS)
    assert 0 < breakable.sum() < len(y)  # the case is not trivial either way
    x_adv = AutoAttackSuite(eps=EPS, version="standard", steps=20, square_queries=50).perturb(model, x, y)
    assert (perturbation_size(x_adv - x, "Linf") <= EPS + 1e-6).all()
    assert _robust(model, x_adv, y).tolist() == (~breakable).tolist()


def test_apgd_iteration_settings_match_the_library_construction():
    from pyautoattack.autopgd_base import APGDAttack

    ours, theirs = APGDAttack(nn.Linear(1, 1), n_iter=100, eps=0.1), APGDAttack(nn.Linear(1, 1), n_iter=37, eps=0.1)
    set_apgd_iterations(ours, 37)
    for key in ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"):
        assert getattr(ours, key) == getattr(theirs, key), key


class NoisyLinear(FixedDefense):
    """Adds Gaussian noise from the defense's own generator and records every draw."""

    def __init__(self, classifier, seed=0):
        super().__init__(classifier, None, None, seed)
        self.draws = []

    def purify(self, x01):
        noise = randn_like(x01, self.generator(x01))
        self.draws.append(noise)
        return x01 + 0.01 * noise


def test_autoattack_neither_touches_the_defense_noise_nor_the_global_rng():
    model, x, y = linear_problem(n=4)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        defense = NoisyLinear(model, seed=5)
        x_adv = AutoAttackSuite(eps=EPS, version="rand", steps=3, eot=2, seed=0).perturb(defense, x, y)
        assert torch.equal(torch.get_rng_state(), state)  # the global stream is restored
        expected = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        assert torch.equal(defense.draws[0], expected)  # the defense's stream is its own
        results.append(x_adv)
    assert torch.equal(results[0], results[1])  # and the caller's global seed changes nothing


def test_autoattack_names_say_when_it_was_shrunk():
    assert AutoAttackSuite(version="rand").name == "AutoAttack-rand"
    assert AutoAttackSuite(version="rand", steps=10, eot=2).name == "AutoAttack-rand(10 iter, EOT 2)"
    both = build_attacks({"name": "autoattack", "version": "standard+rand"}, "Linf", EPS, 0)
    assert [a.version for a in both] == ["standard", "rand"]
    assert attack_label(both, 0.05) == "AutoAttack-standard + AutoAttack-rand + mask-aware(T=0.05)"


@pytest.mark.parametrize("attack, params", [
    ("EOTPGD", {"alpha": 0.01, "eot_iter": 1, "random_start": False}),
    ("FGSM", {}),
])
def test_torchattacks_linf_attacks_reach_the_closed_form_optimum_of_a_two_class_model(attack, params):
    model, x, y = linear_problem(n=8, classes=2)
    steps = 10 if attack == "EOTPGD" else None
    x_adv = TorchAttack.from_settings("Linf", EPS, 0, attack=attack, steps=steps, **params).perturb(model, x, y)
    direction = (model.weight[1 - y] - model.weight[y]).sign().view_as(x)  # towards the other class
    torch.testing.assert_close(x_adv, x + EPS * direction)


def test_torchattacks_apgd_breaks_exactly_the_breakable_points():
    model, x, y = linear_problem(n=16)
    x_adv = TorchAttack.from_settings("Linf", EPS, 0, attack="APGD", steps=20).perturb(model, x, y)
    assert _robust(model, x_adv, y).tolist() == (~linf_breakable(model, x, y, EPS)).tolist()


def test_torchattacks_cw_is_projected_into_the_l2_ball_and_leaves_the_global_rng_alone():
    model, x, y = linear_problem(n=8)
    state = torch.get_rng_state()
    x_adv = TorchAttack.from_settings("L2", 0.05, 0, attack="CW", steps=20, c=10.0, lr=0.05).perturb(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert (perturbation_size(x_adv - x, "L2") <= 0.05 + 1e-6).all()
    assert (perturbation_size(x_adv - x, "L2") > 0).any()


def test_torchattacks_adapter_refuses_what_it_cannot_do():
    with pytest.raises(UserError, match="is an Linf attack"):
        TorchAttack(attack="EOTPGD", norm="L2")
    with pytest.raises(UserError, match="takes no setting"):
        TorchAttack.from_settings("Linf", EPS, 0, attack="FGSM", steps=3)
    with pytest.raises(UserError, match="takes no setting"):
        TorchAttack.from_settings("Linf", EPS, 0, attack="EOTPGD", bogus=1)


class Affine(FixedDefense):
    def purify(self, x01):
        return 0.5 * x01 + 0.25


def test_bpda_forward_is_the_defense_and_backward_skips_the_purifier():
    model, x, y = linear_problem(n=4)
    defense = Affine(model, None)
    target = attack_model(defense, "bpda")
    assert isinstance(target, BPDA)
    x = x.clone().requires_grad_(True)
    torch.testing.assert_close(target(x), defense(x))
    grad_bpda, = torch.autograd.grad(target(x)[:, 0].sum(), x)
    grad_full, = torch.autograd.grad(defense(x)[:, 0].sum(), x)
    torch.testing.assert_close(grad_bpda, model.weight[0].view(3, 4, 4).expand_as(x))  # identity through purify
    torch.testing.assert_close(grad_full, 0.5 * grad_bpda)  # the true chain rule has the 0.5


def test_mask_aware_relaxation_keeps_the_forward_pass_and_moves_the_mask():
    classifier, diffusion = tiny_models()
    defense = build_defense("hetpure", classifier, diffusion, {"t_l": 40, "t_s": 20, "stride": 10, "mask.tau": 0.5})
    relaxed = attack_model(defense, "full", mask_temperature=0.05)
    assert relaxed is not defense and defense.mask_temperature is None
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    defense.reseed(3), relaxed.reseed(3)
    plain_out, relaxed_out = defense(x), relaxed(x)
    torch.testing.assert_close(relaxed_out, plain_out)  # straight-through: the same defense forward
    defense.reseed(3), relaxed.reseed(3)
    plain_grad, = torch.autograd.grad(defense(x).sum(), x)
    relaxed_grad, = torch.autograd.grad(relaxed(x).sum(), x)
    assert not torch.allclose(plain_grad, relaxed_grad)  # the mask now contributes
    mask = relaxed.mask(x)
    mask_grad, = torch.autograd.grad(mask.sum(), x)
    assert mask_grad.abs().sum() > 0 and set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert not defense.mask(x).requires_grad  # the evaluated defense's mask stays detached
    assert attack_model(defense, "surrogate:2", mask_temperature=0.05).mask_temperature == 0.05


def test_mask_aware_needs_a_real_attention_mask():
    classifier, diffusion = tiny_models()
    with pytest.raises(UserError, match="no attention mask"):
        attack_model(build_defense("diffpure", classifier, diffusion), "full", mask_temperature=0.05)
    with pytest.raises(UserError, match="no attention mask"):
        attack_model(build_defense("hetpure-uniform-tl", classifier, diffusion), "full", mask_temperature=0.05)
    assert mask_temperature({"mask_aware": True}) == 0.05 and mask_temperature({}) is None
